"""Library chatter off: the user sees mergecli's own progress, not transformers', datasets' or peft's."""

from __future__ import annotations


def quiet_libraries() -> None:
    """No progress bars or advisory warnings from transformers/datasets/peft in our output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module=r"(transformers|peft|torch|datasets)(\.|$)")
