"""peft-sparta: SpaRTA continual-learning adapters as a Hugging Face PEFT plugin.

Importing this package registers the "SPARTA" PEFT type, after which `get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained` and `AutoPeftModel*` work with SpaRTA adapters. A process that loads a SpaRTA adapter
must `import peft_sparta` first: PEFT has no plugin discovery and otherwise fails with `KeyError: 'SPARTA'`. Every
process-wide change the import makes to PEFT, transformers and the Trainer is listed in `peft_sparta.registration`.
"""

from __future__ import annotations

from .config import SpaRTAConfig
from .errors import SpaRTALoadError
from .export.task_router import TaskRouter
from .layer import Linear, SpaRTALayer
from .model import SpaRTAModel
from .registration import PEFT_TYPE_SPARTA, install


__version__ = "0.1.0.dev0"

install()

__all__ = [
    "PEFT_TYPE_SPARTA",
    "Linear",
    "SpaRTAConfig",
    "SpaRTALayer",
    "SpaRTALoadError",
    "SpaRTAModel",
    "TaskRouter",
    "__version__",
]
