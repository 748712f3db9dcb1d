"""The plugin's effect under the ToCom VTAB protocol, with seeds, per-image records and paired statistics.

``python -m research.paper all`` runs its stages in order; each skips the units it finds finished, so a
killed run resumes where it stopped (a fine-tune or a distillation also resumes mid-run from its
own checkpoint):

0. ``data``: the generated tasks and the distillation split written once (so that processes
   started side by side never write them at the same time);
1. ``plugins``: the standard plugin distilled once per plugin seed on the ImageNet sample (minus a
   held-out tenth, on which the loss of each degree pair is recorded along training);
2. ``finetune``: AdaptFormer on the frozen DeiT-Tiny backbone (the weights the plugin was
   distilled on), per task x source degree x fine-tuning seed, validation curve recorded;
3. ``variants``: the variant plugins (:data:`VARIANTS`), distilled exactly as the standard one
   otherwise: candidate causes (another objective, another augmentation) and the paper's Table 5
   ablations at equal parameters (shared groups, no inversion, cross-entropy);
4. ``predict``: per fine-tuned model, per-image predictions on val200 (every scale of the grid, for
   selection) and on the test set (no plugin, and each plugin at the scales selected on val and at
   the fixed scale), at every target degree; and a record per variant plugin at the endpoint's
   target alone (the other source degree);
5. ``pyra``: the PYRA endpoint: ToMe + LoRA and PYRA (one unit per modulator learning rate, the
   rate then picked per task on val200) fine-tuned at the ``high`` schedule, per task x seed, with
   their per-image test predictions;
6. ``adapt``: the universal plugin adapted without labels to each fine-tuned model of a declared
   subset (``tocom adapt``), its per-image test predictions beside the universal plugin's, and
   the adaptation endpoints in ``docs/results/adapt.{json,md}`` (:mod:`research.paper.adaptation`);
7. ``analyze``: the pre-declared endpoints of ``docs/results/README.md`` with paired bootstrap CIs
   and exact McNemar tests, written to ``docs/results/evidence.{json,md}`` with the predictions.

Units are keyed by content: a model's key hashes the task data, the backbone weights and the
recipe, so changing any of them makes a new unit instead of reusing a stale one. ``shard=(i, n)``
gives a process every n-th unit of each stage from the i-th: n processes on one accelerator, where
a small model alone leaves it idle between kernel launches.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import Subset, TensorDataset
from tqdm.auto import tqdm

from research.paper import adaptation
from research.paper.keys import MODEL, shared_weights
from research.paper.keys import default_device as _default_device
from research.paper.keys import digest as _digest
from research.paper.keys import write_json as _write_json
from tocom.atomic import atomic_write
from tocom.compensator import Compensator
from tocom.data import load_dataset, write_vtab
from tocom.finetuned import checkpoint_metadata, eval_transform_for, load_model
from tocom.jobs.distill import DistillConfig, run_distill
from tocom.jobs.evaluate import EvalRow, make_loader, select_scales, sweep
from tocom.jobs.finetune import FinetuneConfig, run_finetune
from tocom.models import patch
from tocom.report.provenance import content_hash, provenance

STAGES = ("data", "plugins", "variants", "finetune", "predict", "pyra", "adapt", "analyze")
# Each variant plugin changes one distillation setting (keyword arguments of run_distill).
# Candidate causes of a plugin that closes too little of the gap: the objective (L1 on the features
# the head reads, not KL on ImageNet logits) and the augmentation of the distillation images
# (DeiT's, not light).
CAUSES: dict[str, dict[str, object]] = {"feat": {"loss": "feat"}, "deit-aug": {"preset": "paper"}}
# The ToCom paper's Table 5 ablations at equal parameters: the standard plugin stores 16 groups of
# rank 2 (run_distill's defaults), so one shared group gets rank 32, and separate groups for raising
# and lowering the degree (32 of them) get rank 1 each; and cross-entropy on the ImageNet labels in
# place of KL to the backbone at the source degree.
STANDARD_GROUPS, STANDARD_RANK = 16, 2
ABLATIONS: dict[str, dict[str, object]] = {
    "shared": {"variant": "shared", "rank": STANDARD_GROUPS * STANDARD_RANK},
    "no-inversion": {"variant": "no_inversion", "rank": STANDARD_RANK // 2},
    "ce": {"loss": "ce"},
}
VARIANTS: dict[str, dict[str, object]] = {**CAUSES, **ABLATIONS}


@dataclass(frozen=True)
class Protocol:
    """Everything that defines the evidence run; its fields go into every unit's key.

    The values live in ``research/paper/protocols/NAME.json``, one file per protocol, every field
    given (a missing or unknown field is refused); the comments here say what each field means.
    ``paper-mini`` is the declared evidence run; ``smoke`` runs the whole pipeline on a sliver of
    everything in seconds on a CPU (tests and a dry run).
    """

    tasks: tuple[str, ...]
    sources: tuple[int, ...]
    targets: tuple[int, ...]
    finetune_seeds: tuple[int, ...]
    plugin_seeds: tuple[int, ...]
    method: str  # on the frozen backbone, as ToCom's VTAB tables
    preset: str
    epochs: int
    batch_size: int
    plugin_steps: int
    plugin_batch: int
    plugin_lr: float
    plugin_eval_every: int
    # 0 (no delta) and multiples of the trained scale 0.1 around it; the paper's exact grid is not
    # published with its code, so the grid brackets the trained value on both sides.
    scales: tuple[float, ...]
    fixed_scale: float
    generated_test: int
    test_images: int | None  # None: the whole test split
    eval_batch: int
    variants: tuple[str, ...]
    variant_seeds: tuple[int, ...]  # paired with the standard plugin of the same seed
    # PYRA endpoint: the PYRA paper's recipe at its ``high`` schedule, for this protocol's epochs and
    # batch; the modulator's learning rate is picked per task on val200 from this grid.
    pyra_schedule: str
    pyra_modulator_lrs: tuple[float, ...]
    # Adaptation (tocom adapt) of the universal plugin of one seed to each fine-tuned model of a
    # declared subset (docs/results/README.md, "Adaptation"): the CPU budget of one session.
    adapt_tasks: tuple[str, ...]
    adapt_seeds: tuple[int, ...]
    adapt_plugin_seed: int
    adapt_steps: int
    adapt_batch: int
    adapt_lr: float


PROTOCOL_DIR = Path(__file__).with_name("protocols")


def load_protocol(path: Path) -> Protocol:
    """The protocol a JSON file declares: every field of :class:`Protocol`, lists read as tuples."""
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON protocol ({err})") from None
    names = [f.name for f in fields(Protocol)]
    missing, unknown = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or unknown:
        raise ValueError(f"{path}: fields missing {missing}, unknown {unknown}; give exactly the fields "
                         "of research.paper.evidence.Protocol")
    return Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


PROTOCOLS = {path.stem: load_protocol(path) for path in sorted(PROTOCOL_DIR.glob("*.json"))}


class Evidence:
    """Paths, content keys and the units of each stage."""

    def __init__(self, work: str | Path = "runs/evidence", protocol: str = "paper-mini",
                 device: str | None = None, num_workers: int = 0, progress: bool = True,
                 shard: tuple[int, int] = (0, 1), shared: str | Path | None = None,
                 results: str | Path | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
        if not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
        self.name, self.p = protocol, PROTOCOLS[protocol]
        self.shared, self.weights = shared_weights(shared, "the evidence run needs")
        self.work = Path(work) / protocol
        self.device, self.num_workers, self.progress = device, num_workers, progress
        self.shard = shard
        # where a stage that analyses its own units writes (None: such a stage is refused)
        self.results = Path(results) if results is not None else None
        self._digests: dict[str, str] = {}
        # Decoded, preprocessed evaluation images per (task, split): every model of a task reads the
        # same images with the same preprocessing, so the predict stage decodes each split once.
        self._images: dict[tuple[str, str, str], TensorDataset] = {}

    # ----- inputs -------------------------------------------------------------------------
    def task_dir(self, task: str) -> Path:
        if task == "cifar10":
            return self.shared / "data/vtab-1k/cifar10"
        folder = self.work / "data" / task
        if not (folder / "test.txt").is_file():
            seed = ("count", "orientation", "shape", "location").index(task) + 1
            write_vtab(task, folder, seed=seed, image_size=64, n_train=800, n_val=200,
                       n_test=self.p.generated_test, overwrite=True)
        return folder

    def digest(self, path: Path) -> str:
        key = str(path)
        if key not in self._digests:
            self._digests[key] = content_hash(path)
        return self._digests[key]

    def distill_split(self) -> tuple[Path, Path]:
        """Links to the ImageNet sample: nine tenths to distil on, every tenth image held out; each
        part with the ``labels.txt`` lines of its images (the ``ce`` variant trains on them).

        A part whose links or labels differ from what they should be (a killed run, an older
        version) is made again. The ``data`` stage makes them before shards run in parallel.
        """
        source = self.shared / "data/imagenet-sample"
        images = (".jpeg", ".jpg", ".png")
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in images)
        labels = source / "labels.txt"
        lines = ({ln.split()[0]: ln for ln in labels.read_text().splitlines() if ln.strip()}
                 if labels.is_file() else {})
        parts = {self.work / "distill-data/holdout": files[::10],
                 self.work / "distill-data/train": [f for i, f in enumerate(files) if i % 10]}
        for folder, part in parts.items():
            folder.mkdir(parents=True, exist_ok=True)
            linked = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in images)
            if linked != [f.name for f in part]:
                for old in folder.iterdir():
                    old.unlink()
                for path in part:
                    os.symlink(path.resolve(), folder / path.name)
            text = "".join(lines[f.name] + "\n" for f in part if f.name in lines)
            target = folder / "labels.txt"
            if lines and not (target.is_file() and target.read_text() == text):
                atomic_write(target, lambda tmp, text=text: Path(tmp).write_text(text))
        held, train = parts
        return train, held

    # ----- units --------------------------------------------------------------------------
    def plugin_path(self, seed: int, variant: str = "standard") -> Path:
        p = self.p
        parts = [self.digest(self.weights), self.digest(self.shared / "data/imagenet-sample"),
                 p.plugin_steps, p.plugin_batch, p.plugin_lr, seed]
        if variant != "standard":  # the standard plugin keeps the key it had before variants existed
            parts.append(VARIANTS[variant])
        prefix = "" if variant == "standard" else f"{variant}-"
        return self.work / "plugins" / f"{prefix}seed{seed}-{_digest(*parts)}.tocom.safetensors"

    def model_path(self, task: str, source: int, seed: int) -> Path:
        p = self.p
        key = _digest(self.digest(self.weights), self.digest(self.task_dir(task)), p.method, p.preset,
                      p.epochs, p.batch_size, source, seed)
        return self.work / "models" / f"{task}_r{source}_seed{seed}-{key}.safetensors"

    def predictions_path(self, model: Path, variant: str = "standard") -> Path:
        # Keyed by the keys of the model and plugins (content of everything they were made from), not
        # by their bytes: a GPU rerun makes other bytes, and the predictions travel without the model.
        if variant == "standard":
            plugins = [self.plugin_path(s).name for s in self.p.plugin_seeds]
            key = _digest(model.name, plugins, self.p.targets, self.p.scales, self.p.fixed_scale,
                          self.p.test_images)
            return self.work / "predictions" / f"{model.stem}-{key}.json"
        # "reference": the standard plugin again, on the same models and target as the variants, so
        # each variant is compared with it on identical models even where a rerun made new ones.
        kind = "standard" if variant == "reference" else variant
        plugins = [self.plugin_path(s, kind).name for s in self.p.variant_seeds]
        key = _digest(model.name, plugins, self.p.scales, self.p.fixed_scale, self.p.test_images)
        return self.work / "predictions" / "variants" / f"{model.stem}-{variant}-{key}.json"

    def endpoint_target(self, source: int) -> int:
        """The degree a model fine-tuned at ``source`` is moved to in the endpoints: the other source."""
        return max(self.p.sources) if source == min(self.p.sources) else min(self.p.sources)

    def model_records(self, model: Path) -> list[Path]:
        """Every prediction record the predict stage writes for ``model``."""
        variants = [self.predictions_path(model, v) for v in self.variant_records()]
        return [self.predictions_path(model), *variants]

    def variant_records(self) -> tuple[str, ...]:
        """The variants' record names: each variant and, when there are any, the reference."""
        return ("reference", *self.p.variants) if self.p.variants else ()

    def pyra_arms(self) -> list[tuple[str, float | None]]:
        """(method, modulator lr): ToMe + LoRA, then PYRA at each modulator learning rate."""
        return [("lora", None)] + [("pyra", lr) for lr in self.p.pyra_modulator_lrs]

    def pyra_path(self, task: str, seed: int, method: str, modulator_lr: float | None) -> Path:
        p = self.p
        key = _digest(self.digest(self.weights), self.digest(self.task_dir(task)), method, p.pyra_schedule,
                      modulator_lr, p.epochs, p.batch_size, seed)
        arm = method if modulator_lr is None else f"{method}-mlr{modulator_lr:g}"
        return self.work / "pyra" / f"{task}_{arm}_seed{seed}-{key}.safetensors"

    def models(self, seeds: tuple[int, ...] | None = None) -> Iterator[tuple[str, int, int]]:
        """(task, source, seed) units, seed by seed: a run stopped early holds whole seeds."""
        for seed in self.p.finetune_seeds if seeds is None else seeds:
            for task in self.p.tasks:
                for source in self.p.sources:
                    yield task, source, seed

    # ----- stages -------------------------------------------------------------------------
    def run_data(self) -> None:
        for task in self.p.tasks:
            self.task_dir(task)
        self.distill_split()

    def run_plugins(self) -> None:
        for seed in self._todo("plugins", self.p.plugin_seeds, lambda s: self.plugin_path(s)):
            self._distill(seed)

    def run_variants(self) -> None:
        units = [(v, s) for v in self.p.variants for s in self.p.variant_seeds]
        for variant, seed in self._todo("variants", units, lambda u: self.plugin_path(u[1], u[0])):
            self._distill(seed, variant)

    def _distill(self, seed: int, variant: str = "standard") -> None:
        train, held = self.distill_split()
        out = self.plugin_path(seed, variant)
        run_dir = Path(str(out) + ".run")
        _, summary = run_distill(
            DistillConfig(MODEL, train, checkpoint=str(self.weights), steps=self.p.plugin_steps,
            batch_size=self.p.plugin_batch, lr=self.p.plugin_lr, out=out, run_dir=run_dir,
            resume=(run_dir / "last.ckpt").is_file(), num_workers=self.num_workers, device=self.device,
            seed=seed, progress=self.progress, holdout=held, eval_every=self.p.plugin_eval_every,
            decode_once=True,  # 900 small images: decoding them every epoch bounded a GPU run
            **VARIANTS.get(variant, {})))
        _write_json(Path(str(out) + ".json"), {**summary, "variant": variant})

    def run_models(self) -> None:
        """``finetune`` then ``predict`` per model, so a run stopped early has whole units of both."""
        for unit in self._todo("finetune+predict", list(self.models()), self._records_of):
            if not self.model_path(*unit).is_file():
                self._finetune(*unit)
            self._predict(*unit)

    def run_finetune(self) -> None:
        for unit in self._todo("finetune", list(self.models()), lambda u: self.model_path(*u)):
            self._finetune(*unit)

    def _finetune(self, task: str, source: int, seed: int) -> None:
        out = self.model_path(task, source, seed)
        run_dir = Path(str(out) + ".run")
        run_finetune(FinetuneConfig(MODEL, self.task_dir(task), checkpoint=self.weights, method=self.p.method,
                     preset=self.p.preset, r=str(source), epochs=self.p.epochs,
                     batch_size=self.p.batch_size, val_every=1, out=out, run_dir=run_dir,
                     resume=(run_dir / "last.ckpt").is_file(), num_workers=self.num_workers,
                     device=self.device, seed=seed, progress=self.progress))

    def run_predict(self) -> None:
        for unit in self._todo("predict", list(self.models()), self._records_of):
            self._predict(*unit)

    def _records_of(self, unit: tuple[str, int, int]) -> list[Path]:
        return self.model_records(self.model_path(*unit))

    def _predict(self, task: str, source: int, seed: int) -> None:
        """The model's missing prediction records: the standard plugins at every target, then each
        variant at the endpoint's target alone."""
        model_file = self.model_path(task, source, seed)
        jobs = [("standard", self.p.plugin_seeds, list(self.p.targets))]
        jobs += [(v, self.p.variant_seeds, [self.endpoint_target(source)]) for v in self.variant_records()]
        recipe = json.loads(checkpoint_metadata(model_file).get("recipe", "{}"))
        for variant, plugin_seeds, targets in jobs:
            out = self.predictions_path(model_file, variant)
            if out.is_file():
                continue
            record = {"task": task, "source": source, "seed": seed, "model": model_file.name,
                      "model_sha256": self.digest(model_file), "val_acc": recipe.get("val_acc"),
                      "curve": recipe.get("curve"), "variant": variant, "plugins": {},
                      # where the unit ran: the analysis may run elsewhere, from these records alone
                      "ran_on": {**provenance(self.device or _default_device()),
                                 "tf32": torch.backends.cuda.matmul.allow_tf32}}
            for plugin_seed in plugin_seeds:
                plugin_file = self.plugin_path(plugin_seed, "standard" if variant == "reference" else variant)
                plugin = Compensator.load(plugin_file)
                val = self._sweep(model_file, task, "val", source, plugin, self.p.scales, targets)
                chosen = select_scales(val)
                scales = sorted(set(chosen.values()) | {self.p.fixed_scale})
                test = self._sweep(model_file, task, "test", source, plugin, scales, targets)
                record["plugins"][str(plugin_seed)] = {
                    "file": plugin_file.name, "sha256": self.digest(plugin_file), "selected": chosen,
                    "val": [_row(r) for r in val], "test": [_row(r) for r in test]}
            _write_json(out, record)

    def run_pyra(self) -> None:
        units = [(task, seed, *arm) for seed in self.p.finetune_seeds for task in self.p.tasks
                 for arm in self.pyra_arms()]
        record_of = lambda u: self._pyra_record(self.pyra_path(*u))  # noqa: E731
        for task, seed, method, lr in self._todo("pyra", units, record_of):
            out = self.pyra_path(task, seed, method, lr)
            run_dir = Path(str(out) + ".run")
            if not out.is_file():
                run_finetune(FinetuneConfig(MODEL, self.task_dir(task), checkpoint=self.weights,
                                            method=method, preset="pyra-vtab", r=self.p.pyra_schedule,
                                            epochs=self.p.epochs, batch_size=self.p.batch_size,
                                            modulator_lr=lr, val_every=1, out=out, run_dir=run_dir,
                                            resume=(run_dir / "last.ckpt").is_file(),
                                            num_workers=self.num_workers, device=self.device, seed=seed,
                                            progress=self.progress))
            model = load_model(MODEL, out)  # patched, at the schedule it was fine-tuned at
            data = self._eval_images(task, "test", eval_transform_for(out, model))
            row = sweep(model, make_loader(data, self.p.eval_batch), [model.r], 0, device=self.device
                        or _default_device(), progress=self.progress, keep_predictions=True)[0]
            recipe = json.loads(checkpoint_metadata(out).get("recipe", "{}"))
            _write_json(self._pyra_record(out), {
                "task": task, "seed": seed, "method": method, "modulator_lr": lr, "model": out.name,
                "model_sha256": self.digest(out), "schedule": model.r, "val_acc": recipe.get("val_acc"),
                "curve": recipe.get("curve"), "test": _row(row),
                "ran_on": {**provenance(self.device or _default_device()),
                           "tf32": torch.backends.cuda.matmul.allow_tf32}})

    def run_adapt(self) -> None:
        if self.results is None:
            raise ValueError("the adapt stage writes its analysis: give Evidence a results folder")
        adaptation.run_stage(self)
        adaptation.analyze(self, self.results)

    def _pyra_record(self, model: Path) -> Path:
        return self.work / "predictions" / "pyra" / f"{model.stem}.json"

    def _sweep(self, model_file: Path, task: str, split: str, source: int, plugin: Compensator,
               scales, targets: list[int]) -> list[EvalRow]:
        model = patch(load_model(MODEL, model_file))
        data = self._eval_images(task, split, eval_transform_for(model_file, model))
        # decoded tensors already: loader workers would only copy them through shared memory
        return sweep(model, make_loader(data, self.p.eval_batch), targets,
                     source, plugin, scales, device=self.device or _default_device(), split=split,
                     progress=self.progress, keep_predictions=True)

    def _eval_images(self, task: str, split: str, transform) -> TensorDataset:
        """The split's images through ``transform``, decoded on first use and kept."""
        key = (task, split, repr(transform))
        if key not in self._images:
            data = load_dataset(self.task_dir(task), split, transform)
            if split == "test" and self.p.test_images and len(data) > self.p.test_images:
                data = Subset(data, range(self.p.test_images))
            loader = make_loader(data, self.p.eval_batch, self.num_workers)
            images, labels = zip(*loader)
            self._images[key] = TensorDataset(torch.cat(images), torch.cat(labels))
        return self._images[key]

    def _todo(self, stage: str, units, path_of: Callable) -> Iterator:
        """This shard's units with an output missing, with progress and an ETA across them.

        ``path_of(unit)``: the unit's output file, or a list of them (done when all exist).
        """
        first, count = self.shard
        units = list(units)[first::count]

        def done(unit) -> bool:
            paths = path_of(unit)
            return all(path.is_file() for path in (paths if isinstance(paths, list) else [paths]))

        todo = [u for u in units if not done(u)]
        where = f" (shard {first}/{count})" if count > 1 else ""
        print(f"[{stage}]{where} {len(units) - len(todo)} of {len(units)} units done; {len(todo)} to run")
        start = time.time()
        for i, unit in enumerate(tqdm(todo, desc=stage, disable=not self.progress)):
            yield unit
            left = (time.time() - start) / (i + 1) * (len(todo) - i - 1)
            print(f"[{stage}] {unit} done; about {left / 60:.1f} min left in this stage")

    # ----- reading back -------------------------------------------------------------------
    def load_predictions(self) -> tuple[list[dict], tuple[int, ...]]:
        """The prediction records of every fine-tuning seed whose units are all finished, and those seeds.

        A run stopped early is analysed on its whole seeds only; none finished is an error.
        """
        records, complete = [], []
        for seed in self.p.finetune_seeds:
            paths = [self.predictions_path(self.model_path(*u)) for u in self.models((seed,))]
            if all(path.is_file() for path in paths):
                records += [json.loads(path.read_text()) for path in paths]
                complete.append(seed)
        if not complete:
            raise FileNotFoundError("no fine-tuning seed has predictions for every task and source yet: "
                                    "run the earlier stages (python -m research.paper all resumes them)")
        return records, tuple(complete)

    def provenance(self) -> dict:
        return {"protocol": self.name, **asdict(self.p), "weights_sha256": self.digest(self.weights),
                "imagenet_sample_sha256": self.digest(self.shared / "data/imagenet-sample"),
                "tasks_sha256": {t: self.digest(self.task_dir(t)) for t in self.p.tasks}}


def _row(row: EvalRow) -> dict:
    return {**row.as_dict(), "predictions": row.predictions, "labels": row.labels}


def run_evidence(work: str | Path = "runs/evidence", out: str | Path = "docs/results",
                 protocol: str = "paper-mini", stages: tuple[str, ...] = STAGES, device: str | None = None,
                 num_workers: int = 0, progress: bool = True, shard: tuple[int, int] = (0, 1),
                 shared: str | Path | None = None) -> Path | None:
    """Run ``stages`` in order (each resumes its finished units); returns the results file when
    ``analyze`` ran.

    On CUDA, float32 matrix products use TensorFloat-32 (the provenance records it): 10 bits of
    mantissa in the products, accumulation in float32, several times the speed on recent GPUs.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    if shard[1] > 1 and "analyze" in stages:
        raise ValueError("analyze reads every shard's units: run it alone, after the shards finish")
    if (device or _default_device()).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ev = Evidence(work, protocol, device, num_workers, progress, shard, shared=shared, results=out)
    together = {"finetune", "predict"} <= set(stages)
    for stage in STAGES:
        if stage not in stages or (together and stage == "predict"):
            continue
        started = time.time()
        if together and stage == "finetune":
            ev.run_models()
        elif stage == "analyze":
            from research.paper.evidence_report import analyze

            analyze(ev, Path(out))
        else:
            getattr(ev, f"run_{stage}")()
        print(f"[{stage}] finished in {time.time() - started:.0f} s")
    return Path(out) / "evidence.json" if "analyze" in stages else None
