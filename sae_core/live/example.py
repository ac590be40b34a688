"""A steering example for a mined SAE, found from the store rather than hard-coded (feature indices
differ from one training run to the next): the feature whose top contexts peak most often on a
content word (the State of the Union's war, when the corpus has it), clamped to a multiple of its
max activation on a neutral prompt. `saescope demo` ends with it, printing both continuations and
the permalink that shows them on the steering page."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, select

from ..config import GenerationConfig, LiveConfig
from ..model import LanguageModel
from ..store.schema import SAE, Feature, TokenFeature, Vocab
from .interventions import Intervention, steer_permalink
from .runtime import GenerateResult, LiveRuntime

WORDS = (" war", " whale", " sea", " ship", " money")  # in order of preference: words the demo corpus is full of
PROMPT = "My favourite thing to talk about is"
# Times the feature's max activation over the mined tokens. 1x since the demo's recipe changed (2026-12-04): the
# better-trained SAE's war feature writes "the war. The war was a brutal conflict..." at 1x and breaks the text up at 2x
# (2x suited the old, barely trained SAE; README, steering example).
MULTIPLE = 1.0


@dataclass
class SteeringRequest:
    feature: int
    word: str  # the word its top contexts peak on
    intervention: Intervention
    settings: GenerationConfig
    permalink: str  # the steering page that runs it


@dataclass
class SteeringExample:
    request: SteeringRequest
    result: GenerateResult


def find_feature(engine: Engine, sae: str, words: tuple[str, ...] = WORDS) -> tuple[int, str, float] | None:
    """(feature, word, max activation): for the first of `words` any top context peaks on, the feature whose top
    contexts peak on it most often."""
    with engine.connect() as conn:
        for word in words:
            row = conn.execute(
                select(TokenFeature.feature_index, Feature.max_act)
                .join(SAE, SAE.active_run_id == TokenFeature.run_id)
                .join(Vocab, (Vocab.model_id == SAE.model_id) & (Vocab.token_id == TokenFeature.token_id))
                .join(Feature, (Feature.run_id == TokenFeature.run_id) & (Feature.index == TokenFeature.feature_index))
                .where(SAE.name == sae, Vocab.text == word)
                .order_by(TokenFeature.n_examples.desc(), Feature.max_act.desc())
                .limit(1)
            ).first()
            if row is not None:
                return int(row[0]), word, float(row[1])
    return None


def example_request(engine: Engine, sae: str, words: tuple[str, ...] = WORDS, max_new_tokens: int = 24) -> SteeringRequest | None:
    """The example for `sae` (no model needed), or None when no top context peaks on any of `words`."""
    found = find_feature(engine, sae, words)
    if found is None:
        return None
    feature, word, max_act = found
    intervention = Intervention(feature, "clamp", round(MULTIPLE * max_act, 1))
    settings = GenerationConfig(max_new_tokens=max_new_tokens)
    return SteeringRequest(feature, word, intervention, settings, steer_permalink(sae, PROMPT, [intervention], settings))


def steering_example(
    engine: Engine, sae: str, lm: LanguageModel | None = None, max_new_tokens: int = 24, words: tuple[str, ...] = WORDS
) -> SteeringExample | None:
    """The example, run: both continuations."""
    request = example_request(engine, sae, words, max_new_tokens)
    if request is None:
        return None
    result = LiveRuntime(LiveConfig(), engine=engine, lm=lm).generate(sae, PROMPT, [request.intervention], request.settings)
    return SteeringExample(request, result)
