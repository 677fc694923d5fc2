"""Optional backend: lm-evaluation-harness tasks (`pip install 'mergecli[lmeval]'`).

Runs `lm_eval.simple_evaluate` with its Hugging Face model class on a model folder and returns
every numeric metric as "task:metric" (standard errors left out). Local task YAMLs are found
through `include_path`, so a task on a local JSON file runs offline.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MergeCliError
from ..recipe.schema import LmEvalSpec


def run_tasks(folder: Path, spec: LmEvalSpec, root: Path, device: str, tokenizer: Path,
              base: Path | None = None) -> dict[str, float]:
    """Scores of the model in `folder` (a LoRA adapter when `base` is given)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MergeCliError("evaluation.lm_eval needs the lm-evaluation-harness",
                            "pip install 'mergecli[lmeval]' (or remove evaluation.lm_eval)") from None
    include = str((root / spec.include_path).resolve()) if spec.include_path else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    missing = [t for t in spec.tasks if t not in manager.all_tasks]
    if missing:
        raise MergeCliError(f"evaluation.lm_eval.tasks: unknown task(s) {', '.join(missing)}",
                            "check the names, or point include_path at your task YAMLs")
    try:
        model_args = {"pretrained": str(base), "peft": str(folder)} if base else {"pretrained": str(folder)}
        model_args |= {"tokenizer": str(tokenizer), "dtype": "float32", "trust_remote_code": False}
        output = lm_eval.simple_evaluate(model="hf", model_args=model_args,
                                         tasks=list(spec.tasks), task_manager=manager, num_fewshot=spec.num_fewshot,
                                         limit=spec.limit, batch_size=spec.batch_size, device=device,
                                         log_samples=False)
    except Exception as exc:  # noqa: BLE001 - the harness raises many kinds (datasets, network, configs)
        raise MergeCliError(f"lm-evaluation-harness failed on {folder}: {str(exc).splitlines()[0]}") from None
    scores = {}
    for task, metrics in output["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and "stderr" not in name and name != "alias":
                scores[f"{task}:{name}"] = float(value)
    return scores
