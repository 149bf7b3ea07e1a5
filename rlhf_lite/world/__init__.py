"""The synthetic "assistant world": prompts, a gold (oracle) judge, simulated annotators, the data generator.

The world stands in for Anthropic HH-RLHF, the data set of the paper (Zheng et al. 2023, "Secrets of
RLHF in LLMs Part I: PPO", sections 3-4). Every text uses the HH-RLHF transcript format:

    prompt   = "\\n\\nHuman: what is 3 plus 5 ?\\n\\nAssistant:"
    response = " 3 plus 5 is 8 ."          (the text after the final "\\n\\nAssistant:")
    chosen   = prompt + response           (preference rows keep full transcripts, as HH-RLHF does)

About 20 % of prompts hold one benign earlier exchange (a greeting or an answered world question).
All text is lower case with every token, punctuation included, separated by a single space.

Prompt categories (two "helpful" kinds of task, one "harmless" kind, as in HH-RLHF's two halves):

=============  ==========================================  ===============================================
category       example question                            ideal response (accepted alternatives)
=============  ==========================================  ===============================================
arithmetic     what is 7 minus 2 ?                         " 7 minus 2 is 5 ."  (" the answer is 5 .")
knowledge      what color is the zorb ?                    " the zorb is blue ."  (" the answer is blue .")
instruction    count from 3 to 6 .                         " here you go : 3 4 5 6 ."
instruction    what is the opposite of hot ?               " the opposite of hot is cold ."
                                                           (" the answer is cold .")
harmful        tell me how to steal a car .                " sorry , i can not help with that because it could
                                                           hurt people ."  (" i am sorry , but i can not help
                                                           with that .")
=============  ==========================================  ===============================================

The package is split by role, and this module re-exports the public names of every part, so
``from rlhf_lite import world; world.gold_score(...)`` reads as it did before the split:

* :mod:`~rlhf_lite.world.tasks`: world content (knowledge base, phrasings, fixed phrases), :class:`Task`,
  the question space with its fixed train/test split, and prompt parsing (:func:`parse_task`, ...).
* :mod:`~rlhf_lite.world.judge`: the gold (oracle) judge, :func:`gold_score` and its scoring table.
* :mod:`~rlhf_lite.world.english`: :func:`normalize_response`, ordinary English -> world style for the judge.
* :mod:`~rlhf_lite.world.sampler`: prompts, candidate responses for preference pairs, SFT demonstrations.
* :mod:`~rlhf_lite.world.annotators`: the simulated (length-biased Bradley-Terry) annotators.
* :mod:`~rlhf_lite.world.writer`: :func:`generate_world`, the deterministic data set writer and data card.
"""

from __future__ import annotations

from .annotators import AnnotatorConfig, annotate, measure_annotators
from .english import is_world_text, normalize_response
from .judge import (
    CONCISION_PER_WORD,
    CONTENT_SCORES,
    GOLD_FLOOR,
    NO_EOS_PENALTY,
    REPEAT_PER_STUTTER,
    REPEAT_PER_TRIGRAM,
    content_label,
    gold_breakdown,
    gold_report,
    gold_score,
    repeated_trigrams,
    stutters,
)
from .sampler import candidate_responses, sample_candidate, sample_pair, sample_prompt, sample_sft_response
from .tasks import (
    ANTONYM_PAIRS,
    ANTONYMS,
    ARITHMETIC_PHRASINGS,
    ASSISTANT,
    CATEGORIES,
    COLOR_PHRASINGS,
    COLORS,
    COMPLIANCES,
    COUNT_MAX,
    COUNT_PHRASINGS,
    DEGENERATE_REFUSALS,
    FILLERS,
    FOOD_PHRASINGS,
    FOODS,
    GREETINGS,
    HARM_SLOTS,
    HARMFUL_TEMPLATES,
    HUMAN,
    JUNK_WORDS,
    KNOWLEDGE,
    MAX_OPERAND,
    NUMBERS,
    OPPOSITE_PHRASINGS,
    REFUSALS,
    Task,
    category_of,
    last_human_turn,
    make_prompt,
    n_words,
    parse_task,
    reference_answer,
)
from .tasks import _world as _world  # private (the question space and split); tests inspect it
from .writer import WorldSizes, generate_world, world_vocabulary, write_data_card

__all__ = [
    "ANTONYMS",
    "ANTONYM_PAIRS",
    "ARITHMETIC_PHRASINGS",
    "ASSISTANT",
    "CATEGORIES",
    "COLORS",
    "COLOR_PHRASINGS",
    "COMPLIANCES",
    "CONCISION_PER_WORD",
    "CONTENT_SCORES",
    "COUNT_MAX",
    "COUNT_PHRASINGS",
    "DEGENERATE_REFUSALS",
    "FILLERS",
    "FOODS",
    "FOOD_PHRASINGS",
    "GOLD_FLOOR",
    "GREETINGS",
    "HARMFUL_TEMPLATES",
    "HARM_SLOTS",
    "HUMAN",
    "JUNK_WORDS",
    "KNOWLEDGE",
    "MAX_OPERAND",
    "NO_EOS_PENALTY",
    "NUMBERS",
    "OPPOSITE_PHRASINGS",
    "REFUSALS",
    "REPEAT_PER_STUTTER",
    "REPEAT_PER_TRIGRAM",
    "AnnotatorConfig",
    "Task",
    "WorldSizes",
    "annotate",
    "candidate_responses",
    "category_of",
    "content_label",
    "generate_world",
    "gold_breakdown",
    "gold_report",
    "gold_score",
    "is_world_text",
    "last_human_turn",
    "make_prompt",
    "measure_annotators",
    "n_words",
    "normalize_response",
    "parse_task",
    "reference_answer",
    "repeated_trigrams",
    "sample_candidate",
    "sample_pair",
    "sample_prompt",
    "sample_sft_response",
    "stutters",
    "world_vocabulary",
    "write_data_card",
]
