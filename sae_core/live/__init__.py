"""The atlas talks to the model: features on the user's own text, and steering by clamping features.

runtime.LiveRuntime       the model once, the store's SAEs on demand: encode() and generate()
interventions             Intervention (feature, mode clamp/add/scale/cap/ortho, value, condition) and the hook
sweep                     one intervention at several strengths over prompts: lift, KL, fluency cost, a suggestion
frozen                    steering with the unsteered run's attention patterns replayed
pool                      one model process per server, apart from the page handlers: a bounded
                          queue (503 + Retry-After beyond it), a time limit per generation, and
                          cancellation when the client goes away
errors                    LiveError (422), NotFound (404), Unavailable (503)
"""
