"""Feature explanations: each fired feature of a mined SAE explained by a method (`n2g`: token patterns
read from the mined contexts; `llm`: one line from an OpenAI-compatible model), scored on held-out
contexts, and stored per feature and method with a sentence embedding for semantic search.

    stage.explain(sae_name, ExplainConfig) -> ExplainResult     (`saescope explain`)
    base.Explainer / base.Scorer                                 the two halves of a method
    n2g.N2GExplainer, llm.LLMExplainer                           the methods
    embed.embedder()                                             all-MiniLM-L6-v2 sentence embeddings
"""
