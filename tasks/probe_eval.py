"""The `probe` evaluator and report of tasks/linear_probe.py: pick a head of the wd sweep on validation data,
report it on test data.

    evals.probe = dict(type="probe", val=dict(split="train[90%:]"), test=dict(split="test"), log_steps=...)

`val` and `test` are data dicts merged over config.input.data (like a `mean` evaluator's `data`). One pass over
the validation split gives every head's top-1; the head with the best one (ties: the first, i.e. the smallest
index in the sweep) is chosen from those numbers alone, then one pass over the test split reports that head's
top-1, top-5 and balanced accuracy (mean per-class recall over the classes present in the split). The counts are
summed inside jit with the padding masked, on the loop's mesh and params; batching and host padding are
the engine's `SplitPass`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transfer import contracts, evaluators, input_pipeline, metrics

PROBE_DEFAULTS = dict(type="probe", val=None, test=None, pp=None, batch_size=None, log_steps=None)


def wd_label(wd: float) -> str:
    """The name of one sweep value in metric keys and reports: `wd=1e-05`."""
    return f"wd={wd:g}"


def probe_sums(task: Any, params: Any, batch: Mapping) -> dict[str, jax.Array]:
    """Per-head counts of one padded batch: correct@1 / @5 [S], per-class correct [S, C] and examples [C]."""
    logits = task.head_logits(params, batch)  # [S, B, C]
    labels = jnp.asarray(batch[task.label_key], jnp.int32)
    mask = batch["_mask"].astype(jnp.float32)
    num_classes = logits.shape[-1]
    top1 = (jnp.argmax(logits, -1) == labels[None]).astype(jnp.float32) * mask
    top_k = jax.lax.top_k(logits, min(5, num_classes))[1]
    top5 = jnp.any(top_k == labels[None, :, None], -1).astype(jnp.float32) * mask
    onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]  # Out-of-range labels: all zero.
    outside = ((labels < 0) | (labels >= num_classes)).astype(jnp.float32) * mask
    return {
        "count": jnp.sum(mask),
        "correct1": jnp.sum(top1, axis=1),
        "correct5": jnp.sum(top5, axis=1),
        "class_count": jnp.sum(onehot, axis=0),
        "class_correct": jnp.einsum("sb,bc->sc", top1, onehot),
        "outside": jnp.sum(outside),
    }


def select_head(val: Mapping[str, np.ndarray]) -> int:
    """Index of the head with the best validation top-1; ties go to the first."""
    return int(np.argmax(np.asarray(val["correct1"]) / val["count"]))


def summarize(
    val: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    wd_sweep: Sequence[float],
    best: int,
) -> dict[str, float]:
    """The evaluator's numbers from the summed counts of both splits and the chosen head."""
    val_acc = np.asarray(val["correct1"]) / val["count"]
    present = np.asarray(test["class_count"]) > 0
    recall = (
        np.asarray(test["class_correct"])[best][present] / np.asarray(test["class_count"])[present]
    )
    out = {
        "prec@1": float(test["correct1"][best] / test["count"]),
        "prec@5": float(test["correct5"][best] / test["count"]),
        "balanced_accuracy": float(np.mean(recall)),
        "val_prec@1": float(val_acc[best]),
        "wd": float(wd_sweep[best]),
        "wd_index": best,
        "val_examples": int(val["count"]),
        "test_examples": int(test["count"]),
    }
    out.update(
        {f"val_prec@1/{wd_label(w)}": float(a) for w, a in zip(wd_sweep, val_acc, strict=True)}
    )
    return out


def split_totals(split: evaluators.SplitPass, sums: Any, params: Any) -> dict[str, np.ndarray]:
    """The probe's per-head counts summed over one split; no examples or a label outside the classes fail."""
    totals = split.totals(sums, params)
    data = split.input_cfg["data"]
    if not totals or totals["count"] == 0:
        raise ValueError(f"Evaluation data {dict(data)} produced no examples.")
    if totals["outside"]:
        raise ValueError(
            f"{int(totals['outside'])} label(s) of {data['name']!r} split {data['split']!r} lie outside "
            "[0, config.num_classes): set config.num_classes (or config.label_key) to match the data."
        )
    return totals


class ProbeEvaluator:
    """Chooses the sweep's head on `val`, reports it on `test` (see the module docstring)."""

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        evaluators.settings(eval_cfg, PROBE_DEFAULTS, "probe")
        data = {}
        for split in ("val", "test"):
            spec = eval_cfg.get(split)
            data[split] = dict(spec) if hasattr(spec, "keys") else {}  # A dict or a ConfigDict.
            if not data[split].get("split"):
                raise ValueError(
                    f"A 'probe' evaluator needs {split}=dict(split=...) (data keys merged over "
                    f"config.input.data); got {split}={spec!r}."
                )
        task, config = ctx.task, ctx.config
        self.wd_sweep = tuple(task.wd_sweep)
        self._sums = jax.jit(
            lambda params, batch: probe_sums(task, params, batch),
            in_shardings=(ctx.param_shardings, ctx.batch_sharding),
        )
        common = dict(pp=eval_cfg.get("pp"), batch_size=eval_cfg.get("batch_size"))
        self.val = evaluators.SplitPass(dict(common, data=data["val"]), ctx, kind="probe")
        self.test = evaluators.SplitPass(dict(common, data=data["test"]), ctx, kind="probe")
        val_data, test_data = self.val.input_cfg["data"], self.test.input_cfg["data"]
        if val_data == test_data:
            raise ValueError(
                f"The probe's val and test data are the same ({val_data['split']!r}): the weight decay "
                "must be chosen on data the reported numbers do not come from."
            )
        if val_data == dict(config.input.data):
            raise ValueError(
                f"The probe's val data is the training split ({val_data['split']!r}): hold part of it "
                "out, e.g. input.data.split='train[:90%]' and val=dict(split='train[90%:]')."
            )

    def run(self, params: Any) -> dict[str, float]:
        val = split_totals(self.val, self._sums, params)
        best = select_head(val)  # Decided before the test split is read.
        return summarize(val, split_totals(self.test, self._sums, params), self.wd_sweep, best)


# ---------------------------------------------------------------------------------------------- report
def _tower_digest(workdir: str, config: Any, cached: bool) -> tuple[str | None, str | None]:
    """(sha256 of the probed tower's parameters, why it is missing)."""
    from pretrain import features

    data = config.input.data
    try:
        if cached:
            tower = features.load_tower(
                data.checkpoint,
                step=data.get("step"),
                subtree=data.get("subtree") or "img",
                model=data.get("model"),
                npz_prefix=data.get("npz_prefix") or "",
            )
        else:  # The run's own checkpoint holds the frozen tower exactly as it was probed.
            tower = features.load_tower(workdir)
    except (FileNotFoundError, ValueError) as e:
        return None, str(e)
    return tower.digest, None


def protocol(workdir: str, task: Any) -> dict[str, Any]:
    """What was probed and how (of a linear_probe Task): enough to reproduce, or refuse to compare, a number."""
    config, data = task.config, task.config.input.data
    cached = bool(data.get("source"))
    digest, missing = _tower_digest(workdir, config, cached)
    record = dict(
        task=config.task,
        head=config.head,
        mode="cached" if cached else "live",
        checkpoint=data.checkpoint if cached else config.model_init,
        tower_digest=digest,
        layer=str(data.get("layer", "final") if cached else config.features.layer),
        pooling=(data.get("pooling") or "gap") if cached else config.features.pooling,
        wd_sweep=list(task.wd_sweep),
        num_classes=int(config.num_classes),
        label_key=config.label_key,
        dataset=data.name,
        train_split=data.split,
        train_examples=input_pipeline.num_examples(dict(data), 0, 1),
        image_pp=data.pp if cached else config.input.pp,
        input_pp=config.input.pp,
        optimizer=config.optax_name,
        lr=float(config.lr),
        batch_size=int(config.input.batch_size),
        total_steps=int(config.total_steps),
        seed=int(config.seed),
    )
    if missing:
        record["tower_digest_missing"] = missing
    if config.head == "map":
        record["map_head"] = dict(task.map_kw)
    return record


def _results(workdir: str, config: Any) -> dict[str, dict[str, Any]]:
    """The last `probe` row of each probe evaluator in metrics.jsonl, with its splits."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = metrics.read_jsonl(path) if os.path.exists(path) else []
    out = {}
    for name, eval_cfg in (config.evals or {}).items():
        if eval_cfg.get("type") != "probe":
            continue
        found = [r for r in rows if f"{name}/prec@1" in r]
        if not found:
            continue
        row = found[-1]
        numbers = {k[len(name) + 1 :]: v for k, v in row.items() if k.startswith(f"{name}/")}
        numbers.pop("seconds", None)
        numbers["wd_index"] = int(numbers["wd_index"])
        numbers.update(
            step=row["step"], val_split=eval_cfg.val.split, test_split=eval_cfg.test.split
        )
        out[name] = numbers
    return out


def _markdown(results: Mapping[str, Mapping], record: Mapping[str, Any]) -> str:
    lines = [f"# {record['head']} probe: {record['layer']} / {record['pooling']} features", ""]
    if not results:
        lines += ["No `probe` evaluator result in metrics.jsonl (add one to config.evals).", ""]
    head = "| evaluator | step | test split | prec@1 | prec@5 | balanced acc | chosen wd | val prec@1 |"
    lines += [head, "|" + "---|" * 8] if results else []
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['step']} | {r['test_split']} ({r['test_examples']}) | {r['prec@1']:.4f} | "
            f"{r['prec@5']:.4f} | {r['balanced_accuracy']:.4f} | {r['wd']:g} | {r['val_prec@1']:.4f} |"
        )
    for name, r in results.items():
        lines += [
            "",
            f"Weight-decay sweep of `{name}`, top-1 on {r['val_split']} ({r['val_examples']}):",
            "",
        ]
        lines += ["| wd | val prec@1 |", "|---|---|"]
        for i, wd in enumerate(record["wd_sweep"]):
            acc = r.get(f"val_prec@1/{wd_label(wd)}", float("nan"))
            mark = " (chosen)" if i == r["wd_index"] else ""
            lines.append(f"| {wd:g}{mark} | {acc:.4f} |")
    lines += ["", "## Protocol", ""]
    lines += [f"- {k}: `{v}`" for k, v in record.items()]
    return "\n".join(lines) + "\n"


def write_report(workdir: str, task: Any) -> dict[str, Any]:
    """Writes WORKDIR/probe.json ({"results", "protocol"}) and probe.md for a linear_probe Task."""
    results = _results(workdir, task.config)
    record = protocol(workdir, task)
    record["chosen_wd"] = {name: r["wd"] for name, r in results.items()}
    record["eval_splits"] = {
        name: {
            "val": [r["val_split"], r["val_examples"]],
            "test": [r["test_split"], r["test_examples"]],
        }
        for name, r in results.items()
    }
    report = {"results": results, "protocol": record}
    with open(os.path.join(workdir, "probe.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True, default=str)
    with open(os.path.join(workdir, "probe.md"), "w") as f:
        f.write(_markdown(results, record))
    return report
