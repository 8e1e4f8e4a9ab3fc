"""What SpaRTA adds to PEFT's `PeftModel` where PEFT offers no extension point: the model card written by
`save_pretrained`/`push_to_hub`, and loading that fails cleanly.

Each wrapper acts only on SpaRTA adapters and defers to PEFT's own method for every other method.
"""

from __future__ import annotations

import functools
import os

from huggingface_hub import ModelCard
from peft import PeftModel

from .errors import SpaRTALoadError
from .model import find_sparta_tuner
from .registration import PEFT_TYPE_SPARTA


MODEL_CARD_TAGS = ("sparta", "continual-learning")
MODEL_CARD_HEADING = "## SpaRTA adapter"


def _is_sparta(config) -> bool:
    return getattr(config, "peft_type", None) == PEFT_TYPE_SPARTA


def model_card_section(model: PeftModel, adapter_name: str) -> str:
    """Markdown describing a SpaRTA adapter: tasks, ranks, router, and how to load it (import peft_sparta first)."""
    config = model.peft_config[adapter_name]
    tasks = "\n".join(f"{index}. `{name}`" for index, name in enumerate(config.task_names, start=1))
    base = config.base_model_name_or_path or "<base model>"
    return f"""{MODEL_CARD_HEADING}

Continual-learning adapter trained with [SpaRTA](https://pypi.org/project/peft-sparta-cl/): a shared low-rank branch
(rank {config.r_shared}) and one branch of rank {config.r_task} per task, with a `{config.router}` router that picks
the task branch from the input (no task id needed at inference).

Tasks, in training order:
{tasks}

Load it (the `import peft_sparta` line is required: it registers the SPARTA adapter type with PEFT, without it PEFT
raises `KeyError: 'SPARTA'`):

```python
import peft_sparta  # pip install peft-sparta-cl
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this repo>")
model.set_task(None)  # the router decides; or model.set_task("{config.task_names[-1]}")
```
"""


def _add_sparta_card_content(model: PeftModel, output_dir: str) -> None:
    filename = os.path.join(output_dir, "README.md")
    card = ModelCard.load(filename)
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(MODEL_CARD_TAGS))
    section = model_card_section(model, model.active_adapter)
    text = card.text
    if MODEL_CARD_HEADING in text:
        text = text[: text.index(MODEL_CARD_HEADING)].rstrip() + "\n"
    card.text = f"{text}\n{section}"
    card.save(filename)


def _wrap_model_card(original):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if _is_sparta(self.active_peft_config):
            _add_sparta_card_content(self, output_dir)

    return create_or_update_model_card


def _wrap_upload(original):
    @functools.wraps(original)
    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if isinstance(self, PeftModel) and _is_sparta(self.active_peft_config):
            # push_to_hub replaces the card written by save_pretrained with the Hub's one: put SpaRTA's back
            self.create_or_update_model_card(working_dir)
        return original(self, working_dir, *args, **kwargs)

    return _upload_modified_files


def _wrap_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name: str, *args, **kwargs):
        is_new = adapter_name not in self.peft_config
        try:
            return original(self, model_id, adapter_name, *args, **kwargs)
        except Exception as error:
            if not is_new or not (adapter_name in self.peft_config and _is_sparta(self.peft_config[adapter_name])):
                raise
            if len(self.peft_config) > 1:
                self.delete_adapter(adapter_name)
            else:
                self.base_model.unload()
            raise _load_error(error, model_id) from error

    return load_adapter


def _wrap_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        try:
            return original.__func__(cls, model, model_id, *args, **kwargs)
        except Exception as error:
            tuner = find_sparta_tuner(model)
            if tuner is None:
                raise
            tuner.unload()
            raise _load_error(error, model_id) from error

    return classmethod(from_pretrained)


def _load_error(error: Exception, model_id) -> SpaRTALoadError:
    if isinstance(error, SpaRTALoadError):
        return SpaRTALoadError(f"{error} The model was left as it was.")
    return SpaRTALoadError(
        f"Could not load the SpaRTA adapter from {str(model_id)!r}: {type(error).__name__}: {error}. The model was left "
        "as it was. Check that the adapter's files are complete and uncorrupted."
    )


def install() -> None:
    """Wrap PeftModel's card writing, Hub upload and adapter loading, once per process."""
    if getattr(PeftModel, "_sparta_integration", False):
        return
    PeftModel.create_or_update_model_card = _wrap_model_card(PeftModel.create_or_update_model_card)
    PeftModel._upload_modified_files = _wrap_upload(PeftModel._upload_modified_files)
    PeftModel.load_adapter = _wrap_load_adapter(PeftModel.load_adapter)
    PeftModel.from_pretrained = _wrap_from_pretrained(PeftModel.from_pretrained)
    PeftModel._sparta_integration = True
