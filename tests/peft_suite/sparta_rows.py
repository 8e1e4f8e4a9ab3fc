"""SpaRTA rows added to PEFT's custom-model test-suite (copied next to the fetched suite, imported by it)."""

import peft_sparta  # noqa: F401  (registers the SPARTA peft type before the suite builds any config)
from peft_sparta import SpaRTAConfig


# scale 1 on both branches, as LoRA's defaults: the suite trains with large learning rates
RANKS = {"r_shared": 2, "r_task": 4, "alpha_shared": 2, "alpha_task": 4}

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
]
