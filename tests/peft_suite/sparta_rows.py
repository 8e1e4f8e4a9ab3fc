"""SpaRTA rows added to PEFT's custom-model test-suite (copied next to the fetched suite, imported by it)."""

import pytest

import peft_sparta  # noqa: F401  (registers the SPARTA peft type before the suite builds any config)
from peft_sparta import SpaRTAConfig


# scale 1 on both branches, as LoRA's defaults: the suite trains with large learning rates
RANKS = {"r_shared": 2, "r_task": 4, "alpha_shared": 2, "alpha_task": 4}
# the paper design (SpaRTAConfig.paper_design) at the same ranks
PAPER = {"task_branches": "shared", "router": "components", "shared_update": "train", **RANKS}

SPARTA_TEST_CASES = [
    ("Vanilla MLP 1 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin0"], **RANKS}),
    ("Vanilla MLP 2 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin1"], **RANKS}),
    ("Vanilla MLP 3 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin0", "lin1"], **RANKS}),
    ("Vanilla MLP 4 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **RANKS}),
    ("Vanilla MLP 5 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin0"], "dropout": 0.1, **RANKS}),
    ("Vanilla MLP 6 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin0", "lin1"], "use_rslora": True, **RANKS}),
    (
        "Vanilla MLP 7 SpaRTA",
        "MLP",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "r_shared": 0, "r_task": 4, "alpha_task": 4},
    ),
    ("Vanilla MLP 8 SpaRTA", "MLP", SpaRTAConfig, {"target_modules": ["lin0"], "kernel_backend": "eager", **RANKS}),
    ("Embedding + transformers Conv1D 1 SpaRTA", "EmbConv1D", SpaRTAConfig, {"target_modules": ["conv1d"], **RANKS}),
    ("Vanilla MLP 1 SpaRTA paper design", "MLP", SpaRTAConfig, {"target_modules": ["lin0"], **PAPER}),
    ("Vanilla MLP 2 SpaRTA paper design", "MLP", SpaRTAConfig, {"target_modules": ["lin0", "lin1"], **PAPER}),
    (
        "Vanilla MLP 3 SpaRTA paper design",
        "MLP",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "dropout": 0.1, **PAPER},
    ),
    (
        "Vanilla MLP 4 SpaRTA paper design",
        "MLP",
        SpaRTAConfig,
        {"target_modules": ["lin0", "lin1"], "restore_every": 2, "router_components": 3, **PAPER},
    ),
    (
        "Vanilla MLP 5 SpaRTA paper design",
        "MLP",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "kernel_backend": "eager", "router_orth_lambda": 0.0, **PAPER},
    ),
    (
        "Embedding + transformers Conv1D 1 SpaRTA paper design",
        "EmbConv1D",
        SpaRTAConfig,
        {"target_modules": ["conv1d"], **PAPER},
    ),
    (
        "Embedding + transformers Conv1D 2 SpaRTA paper design",
        "EmbConv1D",
        SpaRTAConfig,
        {"target_modules": ["conv1d"], "router_granularity": "token", **PAPER},
    ),
]

SPARTA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "SpaRTA Same",
        "sparta",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "init_weights": False, **RANKS},
        {"target_modules": ["lin0"], "init_weights": False, **RANKS},
    ),
    (
        "SpaRTA Different",
        "sparta",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "init_weights": False, **RANKS},
        {"target_modules": ["lin1"], "init_weights": False, **RANKS},
    ),
    (
        "SpaRTA paper design Same",
        "sparta",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "init_weights": False, **PAPER},
        {"target_modules": ["lin0"], "init_weights": False, **PAPER},
    ),
    (
        "SpaRTA paper design Different",
        "sparta",
        SpaRTAConfig,
        {"target_modules": ["lin0"], "init_weights": False, **PAPER},
        {"target_modules": ["lin1"], "init_weights": False, **PAPER},
    ),
]


def skip_merging_for(skip_if_merging_not_supported):
    """The suite's merge-test skip, which also skips SpaRTA's paper design (task_branches="shared"): its component
    router weighs the two branches per input, which no merged weight can do. Merging it is defined with both weights
    fixed by set_task, which tests/test_paper_design.py checks."""

    def skip(model_id, config_cls, config_kwargs):
        if config_cls is SpaRTAConfig and config_kwargs.get("task_branches") == "shared":
            pytest.skip("SpaRTA's paper design weighs its branches per input: merging needs set_task.")
        skip_if_merging_not_supported(model_id, config_cls, config_kwargs)

    return skip
