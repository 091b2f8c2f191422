"""``align-runner export``: a run's model as a self-contained Hugging Face checkpoint.

    align-runner export outputs/2026-11-26/12-06-20 --output_dir my-model [--merge-lora] [--overwrite]
        [--push-to-hub user/my-model [--private]]

The source is a run dir (its final model: the main stage when that trains a scorer, a reward model,
else the last stage that trains a policy), a run's ``stages/<name>``, or a stage dir of the store. The
export holds safetensors weights, config, tokenizer with its chat template, ``generation_config.json``
and a model card (``README.md``) with the recipe and metrics. It is written into a temp dir beside
``output_dir`` and renamed into place, so a failure never leaves half an export.

LoRA: a stage keeps its adapter in ``model/adapter/`` beside the merged model it saved with
``merge_adapter`` (models/peft.py). ``--merge-lora`` exports that merged model: the merge is done, and
needs no base model to be found again. Without it the adapter is exported, and its
``base_model_name_or_path`` must load from any working directory: a hub id stays a hub id; a local
base (the converted embedded model in ``paths.cache``, a built tiny model, an upstream stage's model in
the store) is copied into ``<output_dir>/base`` and recorded by its absolute path. The adapter is only
valid on exactly that base (the embedded SmolLM2 is dequantized from a GGUF, not the hub's weights),
and the copy keeps the export independent of caches that may be cleaned; the card says how to load it
after moving the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from align_runner.pipeline.rundir import RUN_MANIFEST, STAGES_DIR, stage_dir
from align_runner.pipeline.store import DONE, MANIFEST

PROG = "align-runner export"
MODEL_DIR = "model"
BASE_DIR = "base"  # a local adapter base, copied into the export
ADAPTER_CONFIG = "adapter_config.json"
# rewritten by the export (PEFT's README in model/adapter/ names the base by a path of the run's cwd)
_REWRITTEN = ("README.md", "generation_config.json")


class ExportError(ValueError):
    """A source or output dir that cannot be exported: one line, exit code 2."""


@dataclass(frozen=True)
class Source:
    """A finished training stage, and the run it was exported from (when it was)."""

    stage_dir: Path
    manifest: dict[str, Any]
    run_dir: Path | None = None
    run: dict[str, Any] | None = None  # run.json
    config: dict[str, Any] | None = None  # the run's resolved config.yaml

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / MODEL_DIR

    @property
    def overrides(self) -> list[str] | None:
        """The command line overrides Hydra recorded for a CLI run (an API run records none)."""
        path = self.run_dir / ".hydra" / "overrides.yaml" if self.run_dir else None
        if path is None or not path.is_file():
            return None
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]


# ------------------------------------------------------------------------------------------ source


def find_source(path: str | Path) -> Source:
    """The stage to export from ``path``: a run dir, a run's ``stages/<name>``, or a stage dir."""
    p = Path(path).expanduser()
    if (p / RUN_MANIFEST).is_file():
        run, config = _read_run(p)
        record = final_stage(run.get("stages", []), main_stage(config), where=p)
        return _stage_source(p, record, run, config)
    if p.parent.name == STAGES_DIR and (p.parent.parent / RUN_MANIFEST).is_file():
        run_dir = p.parent.parent
        run, config = _read_run(run_dir)
        record = next((s for s in run.get("stages", []) if s["name"] == p.name), None)
        if record is None:
            names = [s["name"] for s in run.get("stages", [])]
            raise ExportError(f"{p}: run {run_dir} has no stage {p.name!r}; its stages: {names}")
        return _stage_source(run_dir, record, run, config)
    if (p / MANIFEST).is_file():
        return _checked(Source(p, _read_json(p / MANIFEST)))
    if not p.exists():
        raise ExportError(f"{p} does not exist; expected a run dir, a run's stages/<name>, or a stage dir of the store")
    raise ExportError(
        f"{p} is not a run dir (no {RUN_MANIFEST}) nor a stage dir (no {MANIFEST}); expected e.g. "
        "outputs/<date>/<time>, outputs/<date>/<time>/stages/sft or outputs/store/sft-<key12>"
    )


def main_stage(config: dict[str, Any] | None) -> str | None:
    """Name of the stage that reads the ``algorithm`` node: ``algorithm.kind`` in an auto pipeline."""
    if not config:
        return None
    explicit = (config.get("pipeline") or {}).get("stages")
    if explicit:
        return next((s["name"] for s in explicit if s.get("config") == "algorithm"), None)
    return (config.get("algorithm") or {}).get("kind")


def final_stage(stages: list[dict[str, Any]], main: str | None, *, where: Path | str = "run") -> dict[str, Any]:
    """The run's final model among its run.json ``stages``: the main stage when it trains a scorer
    (a reward run), else the last stage that trains a policy, else the last that trains anything."""
    kinds = {s["name"]: _kind(s["kind"], where) for s in stages}
    trained = [s for s in stages if kinds[s["name"]].trains]
    if not trained:
        raise ExportError(f"{where}: no stage of this run trains a model (stages: {[s['name'] for s in stages]})")
    scorer = next((s for s in trained if s["name"] == main and not kinds[s["name"]].policy), None)
    policies = [s for s in trained if kinds[s["name"]].policy]
    return scorer or (policies or trained)[-1]


def _kind(kind: str, where: Path | str):
    from align_runner.registry import get_stage

    try:
        return get_stage(kind)
    except KeyError as e:
        raise ExportError(f"{where}: {e.args[0]}") from None


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    config = run_dir / "config.yaml"
    return _read_json(run_dir / RUN_MANIFEST), yaml.safe_load(config.read_text()) if config.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot be read as JSON ({e})") from None


def _stage_source(run_dir: Path, record: dict[str, Any], run: dict[str, Any], config: dict[str, Any] | None) -> Source:
    d = stage_dir(run_dir, record)
    if not d.exists():
        raise ExportError(
            f"stage {record['name']!r} of run {run_dir} is not here: neither its link {run_dir / STAGES_DIR / record['name']} "
            f"nor its store dir {record.get('dir')} exists (a run dir copied with `cp -r` needs the store where it was; "
            "copy it with `cp -rL` to take the stages along)"
        )
    if not (d / MANIFEST).is_file():
        raise ExportError(f"{d}: stage {record['name']!r} has no {MANIFEST}; expected a finished stage dir")
    return _checked(Source(d, _read_json(d / MANIFEST), run_dir, run, config))


def _checked(src: Source) -> Source:
    d, name, kind = src.stage_dir, src.manifest.get("name"), src.manifest.get("kind")
    if not (d / DONE).exists():
        raise ExportError(f"{d}: stage {name!r} is unfinished (no {DONE} marker); finish the run first")
    if not any(src.model_dir.glob("*.safetensors")):
        raise ExportError(
            f"{d}: stage {name!r} (kind {kind!r}) holds no {MODEL_DIR}/*.safetensors; expected a stage that "
            "trains a model (sft, reward, dpo, grpo, ...)"
        )
    return src


# ------------------------------------------------------------------------------------------ export


def export(
    source: str | Path,
    output_dir: str | Path,
    *,
    merge_lora: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export ``source`` (see ``find_source``) into ``output_dir``; returns its absolute path.

    Refuses a non-empty ``output_dir`` unless ``overwrite``. ``push_to_hub``: a hub repo id to upload
    the export to (created if missing, ``private`` if asked; the token comes from ``HF_TOKEN`` or
    ``hf auth login`` and is never written)."""
    src = find_source(source)
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output_dir {out} is a file; expected a directory to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--output_dir {out} is not empty; pass --overwrite to replace it")
    # a temp dir beside it, so the final rename stays on one filesystem
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(src, tmp, final=out, merge_lora=merge_lora, repo=push_to_hub)
        from align_runner.models.loading import _replace_dir

        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        push(out, push_to_hub, private=private)
    return out


def _write(src: Source, dest: Path, *, final: Path, merge_lora: bool, repo: str | None) -> None:
    from transformers import AutoTokenizer

    from align_runner.model_card import model_card
    from align_runner.models.peft import ADAPTER_DIR

    adapter = src.model_dir / ADAPTER_DIR
    tokenizer = AutoTokenizer.from_pretrained(src.model_dir)
    base = None
    if (adapter / ADAPTER_CONFIG).is_file() and not merge_lora:
        base = _export_adapter(src, adapter, dest, final)
        tokenizer.save_pretrained(dest)
    else:
        _copy_files(src.model_dir, dest)  # its tokenizer files included
    if _kind(src.manifest["kind"], src.stage_dir).policy:  # a reward model generates nothing
        ran_eval = any(s["kind"] == "eval" for s in (src.run or {}).get("stages", []))
        eval_cfg = (src.config or {}).get("eval") if ran_eval else None
        generation_config(src.model_dir, tokenizer, eval_cfg).save_pretrained(dest)
    (dest / "README.md").write_text(model_card(src, adapter_base=base, location=repo or str(final)))


def _copy_files(src: Path, dest: Path, skip: tuple[str, ...] = _REWRITTEN) -> None:
    """Copy the files of a model dir (not its ``adapter/`` folder), except those named in ``skip``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, dest / f.name)


def _export_adapter(src: Source, adapter: Path, dest: Path, final: Path) -> str:
    """Copy the adapter into ``dest`` with a base that loads from anywhere; returns that base."""
    config = _read_json(adapter / ADAPTER_CONFIG)
    base = adapter_base(src, str(config.get("base_model_name_or_path") or ""), adapter / ADAPTER_CONFIG)
    if Path(base).is_dir():
        _copy_files(Path(base), dest / BASE_DIR, skip=())
        base = str(final / BASE_DIR)
    _copy_files(adapter, dest)
    config["base_model_name_or_path"] = base
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return base


def adapter_base(src: Source, recorded: str, where: Path) -> str:
    """Where a LoRA stage's base model is now: an absolute local dir or a hub id.

    A stage that started from an upstream stage's model finds that stage by its key (in the run, else
    beside it in the store), so a moved or copied store still works; otherwise the recorded path (old
    stages may record it relative to the run's working directory) or hub id."""
    from align_runner.models.loading import _HUB_ID

    upstream = (src.manifest.get("upstream") or {}).get("model")
    if upstream:
        records = [s for s in (src.run or {}).get("stages", []) if s.get("key") == upstream]
        candidates = [stage_dir(src.run_dir, r) for r in records] if src.run_dir else []
        candidates += sorted(src.stage_dir.resolve().parent.glob(f"*-{upstream[:12]}"))
        found = next((d / MODEL_DIR for d in candidates if (d / MODEL_DIR / "config.json").is_file()), None)
        if found is not None:
            return str(found.resolve())
    path = Path(recorded).expanduser()
    if recorded and path.is_dir():
        return str(path.resolve())
    if _HUB_ID.match(recorded):
        return recorded
    raise ExportError(
        f"the adapter's base model {recorded!r} (recorded in {where}) is neither a directory here nor a hub id; "
        "export the merged model with --merge-lora, which needs no base"
    )


def generation_config(model_dir: Path, tokenizer: Any, eval_cfg: dict[str, Any] | None):
    """The model's generation config with the tokenizer's eos and pad, sampling as the run's eval did.

    Only the temperature is carried over: eval's ``max_new_tokens`` suits its task, not every use."""
    from transformers import GenerationConfig

    from align_runner.engine.rollout import eos_token_ids

    has_own = (model_dir / "generation_config.json").is_file()
    gen = GenerationConfig.from_pretrained(model_dir) if has_own else GenerationConfig()
    gen.eos_token_id = eos_token_ids(SimpleNamespace(generation_config=gen), tokenizer)
    gen.pad_token_id = tokenizer.pad_token_id
    if eval_cfg and eval_cfg.get("temperature") is not None:
        temperature = float(eval_cfg["temperature"])
        gen.do_sample = temperature > 0  # eval's 0 means greedy
        if temperature > 0:
            gen.temperature = temperature
    return gen


def push(folder: Path, repo_id: str, *, private: bool) -> None:
    """Upload ``folder`` to the hub model repo ``repo_id`` (created when missing)."""
    from huggingface_hub import HfApi

    api = HfApi()  # reads the token from HF_TOKEN or the stored login; nothing here writes it
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Upload align_runner export")


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:  # dispatched by `align-runner export ...` with the command name
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("source", help="a run dir (outputs/<date>/<time>), a run's stages/<name>, or a store stage dir")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="where to write the checkpoint")
    parser.add_argument("--merge-lora", "--merge_lora", action="store_true",
                        help="export a LoRA stage as its merged full model instead of the adapter")
    parser.add_argument("--push-to-hub", "--push_to_hub", metavar="REPO", help="then upload to this hub repo id")
    parser.add_argument("--private", action="store_true", help="create the hub repo private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    args = parser.parse_args(argv)
    try:
        if args.private and not args.push_to_hub:
            raise ExportError("--private applies to --push-to-hub REPO, which is not given")
        out = export(args.source, args.output_dir, merge_lora=args.merge_lora, push_to_hub=args.push_to_hub,
                     private=args.private, overwrite=args.overwrite)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(out)
    if args.push_to_hub:
        print(f"uploaded to the hub repo {args.push_to_hub}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
