"""``sdtm generate``: images from a local diffusers folder of any registered model family, with or
without SDTM.

The pipeline class is the one ``model_index.json`` names, one of the families' ``pipeline_classes``
(``PIPELINES``); the folder must hold the text encoders and tokenizers that turn the prompts into
embeddings (the family's ``text_components``). Per family (its adapter in sdtm.models): the default
``--guidance`` and what it means (classifier-free guidance with an empty negative prompt, where values <= 1
switch guidance off; or a guidance-distilled model's guidance, an input of the transformer, one pass per
step, which a model without a guidance embedding does not take and records as null), the pipeline call's
own switches (``generate_call_kwargs``: e.g. generating at exactly ``--height`` x ``--width`` and passing the
prompt to the text encoder as written), and the size rule: multiples of the VAE factor times the latent
pixels a token spans (``token_side``), and of the pipeline's own ``pixel_multiple``, with a token grid
within the positional table (``max_token_grid``). The SDTM switch step defaults to the family's
(``ModelAdapter.resolve_config``), recorded as a number in the manifest.

One PNG per prompt, ``OUT/<stem>.png`` (the stem is the prompt's id made safe, see ``sdtm.cli.prompts``), and
``OUT/manifest.json`` (strict JSON: no NaN or Infinity)::

    {"settings": {"model", "pipeline", "prompts", "steps", "height", "width", "guidance", "batch_size",
                  "seed", "dtype", "device", "world_size", "sdtm": {...} or null, "cache": name or null},
     "images": [{"index", "id", "prompt", "seed", "file", "seconds", "macs"[, "settings"]}, ...],
     "other_images": [{"id", "prompt", "seed", "file", "seconds", "macs"[, "settings"]}, ...]}

``images`` follows the prompt list. Image ``i`` of the prompt list starts from the noise of seed
``--seed + i``; SDTM draws its random window destinations from its own generator, reseeded with
``--sdtm-seed`` at every pipeline call (torch's global RNG plays no part). With ``--batch-size 1`` every
image is therefore the same whatever the sharding or resuming; in larger batches an image's draws depend
on its place in the batch. ``seconds`` is the batch's wall time divided by its size; ``macs`` is null (not measured). Every
component of the pipeline is cast to ``--dtype`` after loading (except the sub-modules a model keeps in
float32 on purpose, such as T5's ``wo`` under float16).

Resuming: a prompt whose PNG exists is skipped. The previous manifest's record for the same file name
must name the same prompt text and seed, else the run stops before loading the model (use a new --out
or delete those images); a PNG without a record is kept as it is. A kept record that was made with other
image-changing settings (model, steps, height, width, guidance, dtype, sdtm, cache) than this run carries them
under ``settings`` (and a warning says so). ``other_images`` keeps the records of earlier PNGs in OUT
that the current prompt list does not produce, so a later run can still check them. PNGs and the
manifest are written to a temporary file in OUT and renamed, so an interrupted run leaves only finished
files; the manifest is rewritten after every batch.

Exit codes: 2 for bad arguments or files, found before the model is loaded where possible (one line
``sdtm generate: <reason>`` on stderr); 1 when a PNG or the manifest cannot be written later (one line
``sdtm generate: cannot write <path>: <reason>``).

Several processes: under ``torchrun --nproc_per_node=N`` (RANK / WORLD_SIZE / LOCAL_RANK set) prompt ``i``
goes to rank ``i % N``, CUDA ranks use ``cuda:LOCAL_RANK`` (NCCL), CPU ranks gloo; rank 0 writes the
manifest (after each of its own batches, then once more with every rank's records gathered).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .cli_options import add_sdtm_options, config_from_args, positive_int, sdtm_option
from ..core.config import SDTMConfig
from ..models import families
from ..models.base import ModelAdapter
from .prompts import Prompt, load_prompts, single_prompt

MANIFEST_NAME = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Ranks that finish early wait at the final gather for the slowest one, possibly for hours.
COLLECTIVE_TIMEOUT = datetime.timedelta(days=7)
_TEMP_NAME = re.compile(r"^\.(.+)\.[0-9a-f]{12}\.tmp$")
# The seed is not listed: each record holds its image's own seed, which must match to keep the image.
_SETTINGS_THAT_CHANGE_IMAGES = ("model", "steps", "height", "width", "guidance", "dtype", "sdtm", "cache", "frames")
_RECORD_LISTS = ("images", "other_images")
_QUOTED_PROMPT_LENGTH = 40


def _pipelines() -> dict[str, ModelAdapter]:
    """Pipeline class name -> its family, for every registered family."""
    return {name: adapter for adapter in families() for name in adapter.pipeline_classes}


PIPELINES = _pipelines()


@dataclass(frozen=True)
class ModelInfo:
    """What a diffusers folder's config files say, read before loading it.

    pipeline: the pipeline class (model_index.json). vae_scale: the VAE's down-sampling factor.
    patch_size: latent pixels a token spans on each side (``ModelAdapter.token_side``). max_grid: the
    positional table's side in tokens (None: any size). guidance_refusal: why the model takes no guidance
    (``ModelAdapter.guidance_refusal``), or None."""

    pipeline: str
    family: ModelAdapter
    vae_scale: int
    patch_size: int
    max_grid: int | None
    guidance_refusal: str | None = None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns it."""
    parser = subparsers.add_parser(
        "generate", help=f"generate images from a local {_titles()} diffusers folder (resumable, torchrun)",
        description=description())
    configure_parser(parser)
    return parser


def _titles() -> str:
    titles = [adapter.title for adapter in families()]
    return ", ".join(titles[:-1]) + " or " + titles[-1] if len(titles) > 1 else titles[0]


def _guidance_meaning(adapter: ModelAdapter) -> str:
    if adapter.distilled_guidance:
        return (f"{adapter.title} is guidance-distilled: no negative prompt, --guidance is the guidance the "
                "transformer is conditioned on (one pass per step)")
    return f"{adapter.title} runs classifier-free guidance with an empty negative prompt"


def description() -> str:
    """The description of ``sdtm generate``, with what each registered family does."""
    return ("Loads a local diffusers folder offline with the pipeline class its model_index.json names "
            f"({', '.join(PIPELINES)}; text encoders included), writes one output per prompt and "
            "OUT/manifest.json, skips prompts whose output exists, and shards the prompts across torchrun "
            "processes. Image i of the prompt list uses seed --seed + i. "
            + ". ".join(_guidance_meaning(adapter) for adapter in families()) + ".")


def _guidance_help() -> str:
    parts = []
    for adapter in families():
        if adapter.distilled_guidance:
            parts.append(f"{adapter.title}: the distilled guidance the transformer is conditioned on (default "
                         f"{adapter.default_guidance}); not accepted by a model without a guidance embedding")
        else:
            parts.append(f"{adapter.title}: the classifier-free guidance scale, <= 1 switches guidance off "
                         f"(default {adapter.default_guidance})")
    return "finite and >= 0. " + "; ".join(parts)


def _size_help() -> str:
    rules = []
    for adapter in families():
        rule = f"{adapter.title}: the VAE factor x {adapter.token_phrase(adapter.token_side({}))}"
        if adapter.pixel_multiple > 1:
            rule += f", and a multiple of {adapter.pixel_multiple}"
        rules.append(rule)
    return f"pixels, a multiple of {'; '.join(rules)} (default 1024)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``generate`` to ``parser``."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help=f"local diffusers folder of a {', '.join(PIPELINES)} (the class its model_index.json "
                             "names), with its text encoders")
    parser.add_argument("--prompt", metavar="TEXT", help="one prompt (id 00000); or use --prompts")
    parser.add_argument("--prompts", metavar="FILE",
                        help=".txt (one prompt a line), .json (list of strings or objects, COCO captions) or "
                             ".jsonl (one object a line); objects: caption/prompt/text and image_id/id")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--steps", type=positive_int, default=28, help="denoising steps (default 28)")
    parser.add_argument("--height", type=positive_int, default=1024, help=_size_help().replace("%", "%%"))
    parser.add_argument("--width", type=positive_int, default=1024, help="pixels, as --height (default 1024)")
    videos = ", ".join(f"{a.name} {a.default_frames}" for a in PIPELINES.values() if a.video)
    parser.add_argument("--frames", type=positive_int, default=None,
                        help=f"frames of a video model's clips (default: the family's: {videos}; images: 1)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="prompts per pipeline call (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="image i of the prompt list uses seed + i (default 0)")
    parser.add_argument("--guidance", type=float, default=None, help=_guidance_help().replace("%", "%%"))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="model dtype (default float16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    from .caches import CACHES, runs_on

    parser.add_argument("--cache", choices=CACHES, default="none",
                        help="a step cache under SDTM (or alone with --no-sdtm) on a deterministic schedule computing "
                             "about 70%% of the steps (sdtm.cli.caches): fbcache (diffusers' FirstBlockCache; "
                             f"{', '.join(runs_on('fbcache'))}), taylorseer (diffusers' TaylorSeerCache on the "
                             "blocks), cache-dit (DBCache, the [cache] extra); recorded in the manifest (default none)")
    add_sdtm_options(parser, family_switch_step=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m sdtm.cli.generate ...``: the same options as ``sdtm generate``."""
    parser = argparse.ArgumentParser(prog="python -m sdtm.cli.generate", description="sdtm generate: " + description())
    configure_parser(parser)
    return run(parser.parse_args(argv))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class OutputError(Exception):
    """A file in the output folder could not be written (or removed) during the run."""

    def __init__(self, path: str, error: OSError, action: str = "write") -> None:
        self.path, self.action = path, action
        self.reason = " ".join(str(error.strerror or error).split())
        super().__init__(f"cannot {action} {path}: {self.reason}")


@dataclass(frozen=True)
class Job:
    """Validated settings of one run."""

    model: str
    pipeline: str
    prompts_file: str | None
    prompts: list[Prompt]
    out: str
    steps: int
    height: int
    width: int
    batch_size: int
    seed: int
    guidance: float | None
    dtype: torch.dtype
    device: torch.device
    sdtm: SDTMConfig | None
    ranks: Ranks
    cache: str | None = None  # a step cache of sdtm.cli.caches (None: none)
    frames: int = 1  # frames of a video family's clips (images: 1)

    @property
    def family(self) -> ModelAdapter:
        return PIPELINES[self.pipeline]

    def path(self, index: int) -> str:
        return os.path.join(self.out, self.file(index))

    def file(self, index: int) -> str:
        return self.prompts[index].stem + self.family.output_suffix

    def settings(self) -> dict:
        return {
            "model": self.model, "pipeline": self.pipeline, "prompts": self.prompts_file, "steps": self.steps, "height": self.height,
            "width": self.width, "guidance": self.guidance, "batch_size": self.batch_size, "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "world_size": self.ranks.world_size,
            "sdtm": dataclasses.asdict(self.sdtm) if self.sdtm is not None else None,
            "cache": self.cache,
            **({"frames": self.frames} if self.family.video else {}),
        }

    def image_settings(self) -> dict:
        """The settings besides prompt and seed that change the images (``frames`` for video families only)."""
        settings = self.settings()
        return {key: settings[key] for key in _SETTINGS_THAT_CHANGE_IMAGES if key in settings}

    def record(self, index: int, seconds: float | None, macs: float | None = None) -> dict:
        prompt = self.prompts[index]
        return {"index": index, "id": prompt.id, "prompt": prompt.text, "seed": self.seed + index,
                "file": self.file(index), "seconds": seconds, "macs": macs}


def run(args: argparse.Namespace) -> int:
    """Generate every missing image of the prompt list; returns the exit code (2: bad arguments or files,
    after one line ``sdtm generate: <reason>`` on stderr, from rank 0 only under torchrun since every rank
    checks the same arguments; 1: a file in OUT could not be written, after one such line)."""
    rank = 0
    try:
        ranks = ranks_from_env()
        rank = ranks.rank
        job = job_from_args(args, ranks)
        previous = read_manifest(job.out)
        check_existing_images(job, previous)
    except ValueError as error:
        return _usage_error(error, show=rank == 0)
    existing = {i for i in range(len(job.prompts)) if os.path.exists(job.path(i))}
    mine = list(range(ranks.rank, len(job.prompts), ranks.world_size))
    pending = [i for i in mine if i not in existing]
    records = _kept_records(job, previous, existing) if rank == 0 else {}
    others = _other_records(job, previous) if rank == 0 else []
    if rank == 0:
        _warn_on_changed_settings(job, records)
    try:
        pipe = load_pipeline(job) if pending else None
    except ValueError as error:
        return _usage_error(error, show=True, prefix=f"rank {rank}: " if ranks.distributed else "")
    try:
        _remove_stale_temps(job.out, {job.file(i) for i in mine} | ({MANIFEST_NAME} if rank == 0 else set()))
        _run_job(job, pipe, pending, records, others)
    except OutputError as error:
        print(f"sdtm generate: {error}", file=sys.stderr)
        return 1
    return 0


def _run_job(job: Job, pipe: Any, pending: list[int], records: dict[int, dict], others: list[dict]) -> None:
    """Generate ``pending`` (this rank's missing images); rank 0 writes the manifest: ``records`` (those of
    the images kept, then of the new ones) and ``others`` (see ``_other_records``)."""
    rank = job.ranks.rank
    with _process_group(job):
        new: dict[int, dict] = {}
        for batch_records in _generate(job, pipe, pending):
            new.update(batch_records)
            if rank == 0:
                records.update(batch_records)
                write_manifest(job, records, others)
        if job.ranks.distributed:
            import torch.distributed as dist

            gathered: list[dict[int, dict]] | None = [{} for _ in range(job.ranks.world_size)] if rank == 0 else None
            dist.gather_object(new, gathered, dst=0)
            for part in gathered or []:
                records.update(part)
        if rank == 0:
            write_manifest(job, records, others)


def _usage_error(error: ValueError, show: bool, prefix: str = "") -> int:
    if show:
        print(f"sdtm generate: {prefix}{' '.join(str(error).split())}", file=sys.stderr)
    return 2


def ranks_from_env() -> Ranks:
    """Rank, world size and local rank from torchrun's environment; a single process without it."""
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    world_size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
                         f"LOCAL_RANK={local_rank}.")
    return Ranks(rank, world_size, local_rank)


def job_from_args(args: argparse.Namespace, ranks: Ranks = Ranks()) -> Job:
    """Check every argument and file that can be checked without loading the model; raises ValueError."""
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give exactly one of --prompt TEXT and --prompts FILE.")
    info = model_info(args.model)
    check_size(args.height, args.width, info.vae_scale, info.patch_size, info.max_grid,
               token=info.family.token_phrase(info.patch_size), pixel_multiple=info.family.pixel_multiple,
               pipeline=info.pipeline)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    guidance = resolve_guidance(args.guidance, info)
    frames = info.family.default_frames if getattr(args, "frames", None) is None else args.frames
    info.family.latent_frames(frames)  # raises ValueError for a count the family does not generate
    prompts = single_prompt(args.prompt) if args.prompt is not None else load_prompts(args.prompts)
    if args.seed < 0 or args.seed + len(prompts) > 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63 - {len(prompts)}] for {len(prompts)} prompts, got {args.seed}.")
    sdtm = sdtm_from_args(args)
    if sdtm is not None:
        sdtm = resolve_switch_step(sdtm, info, args.steps)
    device = resolve_device(args.device, ranks)
    if sdtm is not None:
        from ..core.ops import ops_for

        ops_for(sdtm.backend, device)  # raises ValueError if the backend cannot run on this device
        if sdtm.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, got --device {device}.")
    cache = None if getattr(args, "cache", "none") == "none" else args.cache
    if cache is not None:
        from .caches import check_cache

        check_cache(cache, info.family.name)
        if sdtm is not None and sdtm.cuda_graphs:
            raise ValueError(f"--cuda-graphs cannot replay the blocks a step cache skips; drop --cuda-graphs or "
                             f"--cache {cache}.")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    for option in ("model", "prompts", "out"):
        _check_utf8_path(option, getattr(args, option))
    out = prepare_output_folder(args.out)
    job = Job(model=os.path.abspath(args.model), pipeline=info.pipeline,
              prompts_file=args.prompts and os.path.abspath(args.prompts), prompts=prompts, out=out,
              steps=args.steps, height=args.height, width=args.width, batch_size=args.batch_size, seed=args.seed,
              guidance=guidance, dtype=dtype, device=device, sdtm=sdtm, ranks=ranks, cache=cache, frames=frames)
    try:
        manifest_bytes(job, {})
    except ValueError as error:  # a backstop: the checks above should leave nothing unwritable
        raise ValueError(f"the settings cannot be written to {MANIFEST_NAME}: {error}.") from None
    return job


def resolve_guidance(given: float | None, info: ModelInfo) -> float | None:
    """The guidance of the pipeline call: ``given`` or the family's default; None for a model that takes none
    (``ModelAdapter.guidance_refusal``, e.g. a guidance-distilled model without a guidance embedding).
    Raises ValueError for a value that is not finite or negative, and for a guidance given to a model that
    would ignore it."""
    family = info.family
    if info.guidance_refusal is not None:
        if given is not None:
            raise ValueError(f"--guidance: this {info.pipeline} {info.guidance_refusal}, so it takes no guidance; "
                             "drop --guidance.")
        return None
    value = family.default_guidance if given is None else given
    if value is None:  # a family without a default guidance passes none
        return None
    if not math.isfinite(value) or value < 0:
        if family.distilled_guidance:
            raise ValueError(f"--guidance ({family.title}'s distilled guidance) must be a finite number >= 0, got "
                             f"{value}.")
        raise ValueError(f"--guidance must be a finite number >= 0 (values <= 1 switch guidance off), got {value}.")
    return value


def resolve_switch_step(sdtm: SDTMConfig, info: ModelInfo, steps: int) -> SDTMConfig:
    """``sdtm`` with ``switch_step=None`` replaced by the family's default for ``steps`` steps (as
    apply_sdtm would resolve it), so that the manifest records the number."""
    return info.family.resolve_config(sdtm, steps)


def sdtm_from_args(args: argparse.Namespace) -> SDTMConfig | None:
    """The SDTM settings (None with --no-sdtm; ``switch_step`` None: the family's default, see
    ``resolve_switch_step``); raises ValueError on a bad value, on a number that is not finite (it could
    not be recorded in the manifest), and on SDTM options given with --no-sdtm (they would be ignored)."""
    fields = dataclasses.fields(SDTMConfig)
    if getattr(args, "no_sdtm", False):
        defaults = SDTMConfig(switch_step=None)  # generate's --switch-step defaults to the family's (None)
        given = [_flag(f.name) for f in fields if sdtm_option(args, f.name, getattr(defaults, f.name))
                 != getattr(defaults, f.name)]
        if given:
            raise ValueError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with "
                             "--no-sdtm; drop one or the other.")
        return None
    for field in fields:
        value = sdtm_option(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{_flag(field.name)} must be a finite number, got {value}.")
    try:
        return config_from_args(args)
    except TypeError as error:
        raise ValueError(str(error)) from None


def prepare_output_folder(out: str) -> str:
    """The absolute path of ``--out``, created if missing and checked to be writable; raises ValueError."""
    folder = os.path.abspath(out)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--out {out!r} exists and is not a folder.")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create --out {out!r}: {error.strerror or error}.") from None
    check_writable(folder, out)
    return folder


def check_writable(folder: str, shown: str) -> None:
    """Create and remove a probe file in ``folder``; raises ValueError naming ``shown`` if that fails
    (``os.access`` says yes to root whatever the folder)."""
    probe = os.path.join(folder, f".sdtm-write-check.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"cannot write to --out {shown!r}: {error.strerror or error}.") from None


def _check_utf8_path(option: str, path: str | None) -> None:
    """Paths are recorded in the manifest, which is UTF-8."""
    if path is None:
        return
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"--{option} {path!r} is not valid UTF-8, so the manifest cannot record it; "
                         "rename it.") from None


def _flag(name: str) -> str:
    return "--sdtm-seed" if name == "seed" else "--" + name.replace("_", "-")


def model_info(model: str) -> ModelInfo:
    """The pipeline class and geometry of the diffusers folder ``model``, from its config files; raises
    ValueError for a folder that is not a supported pipeline, lacks the text encoders the prompts need,
    or whose transformer does not belong to its pipeline."""
    if not os.path.isdir(model):
        raise ValueError(f"--model folder {model!r} does not exist.")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"--model {model!r} is not a diffusers pipeline folder (no model_index.json).")
    index = _read_json_object(os.path.join(model, "model_index.json"))
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise ValueError(f"--model {model!r}: model_index.json names the pipeline {pipeline!r}; sdtm generate loads "
                         f"{', '.join(PIPELINES)} folders.")
    family = PIPELINES[pipeline]
    for name in ("transformer", "vae", *family.text_components):
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
            what = ("sdtm generate turns the prompts into embeddings with the pipeline's text encoders"
                    if name in family.text_components else "the pipeline needs it")
            raise ValueError(f"--model {model!r}: model_index.json lists no {name} (got {json.dumps(entry)}); "
                             f"{what}, so use a folder that has it.")
    vae = _read_json_object(os.path.join(model, "vae", "config.json"))
    transformer = _read_json_object(os.path.join(model, "transformer", "config.json"))
    transformer_class = transformer.get("_class_name")
    if transformer_class not in family.config_classes or not family.owns_config(transformer):
        raise ValueError(f"--model {model!r}: transformer/config.json names {transformer_class!r}, not the "
                         f"{family.config_classes[0]} of a {pipeline}.")
    vae_scale = family.vae_scale_of_config(vae)
    patch_size = family.token_side(transformer) if "patch_size" in transformer else None
    if vae_scale is None or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"--model {model!r}: vae/config.json needs block_out_channels (or scale_factor_spatial) and "
                         f"transformer/config.json a patch_size, as a {pipeline} folder has.")
    return ModelInfo(pipeline, family, vae_scale, family.token_side(transformer), family.max_token_grid(transformer),
                     family.guidance_refusal(transformer))


def model_geometry(model: str) -> tuple[int, int, int | None]:
    """(VAE down-sampling factor, latent pixels a token spans on each side, positional table side in
    tokens or None) of a supported diffusers folder (see ``model_info``)."""
    info = model_info(model)
    return info.vae_scale, info.patch_size, info.max_grid


def check_size(height: int, width: int, vae_scale: int, patch_size: int, max_grid: int | None,
               token: str | None = None, pixel_multiple: int = 1, pipeline: str = "pipeline") -> None:
    """Height and width must be positive multiples of vae_scale * patch_size (and of ``pixel_multiple``,
    the pipeline's own rule) whose token grid fits the positional table (``max_grid`` tokens a side).
    ``token``: the token's side in the message (``ModelAdapter.token_phrase``; default "patch N")."""
    token_pixels = vae_scale * patch_size
    multiple = math.lcm(token_pixels, pixel_multiple)
    token = token or f"patch {patch_size}"
    if height < 1 or width < 1 or height % multiple or width % multiple:
        rule = f"VAE factor {vae_scale} x {token}"
        if multiple != token_pixels:
            rule += f", and the {pipeline} takes multiples of {pixel_multiple} only"
        raise ValueError(f"--height and --width must be positive multiples of {multiple} for this model "
                         f"({rule}), got {height}x{width}.")
    grid_h, grid_w = height // token_pixels, width // token_pixels
    if max_grid is not None and max(grid_h, grid_w) > max_grid:
        raise ValueError(f"{height}x{width} needs a {grid_h}x{grid_w} token grid but the model's positional table "
                         f"covers {max_grid}x{max_grid} tokens (at most {max_grid * token_pixels} pixels a side).")


def resolve_device(requested: str | None, ranks: Ranks) -> torch.device:
    """The device to run on: ``requested`` or cuda/cpu; under torchrun a CUDA device is cuda:LOCAL_RANK
    (an explicit other index is refused rather than ignored)."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        backend = getattr(torch, device.type, None)
        if device.type == "meta" or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
            raise ValueError(f"--device {name!r}: no such device is available on this machine.")
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine.")
    if ranks.distributed:
        if device.index is not None and device.index != ranks.local_rank:
            raise ValueError(f"--device {name!r}: under torchrun rank {ranks.rank} uses cuda:{ranks.local_rank} "
                             "(its LOCAL_RANK); pass --device cuda.")
        device = torch.device("cuda", ranks.local_rank)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{device} does not exist: {torch.cuda.device_count()} CUDA device(s).")
    return device


def load_pipeline(job: Job) -> Any:
    """The pipeline of ``job.model`` (class ``job.pipeline``, local files only) on ``job.device`` in
    ``job.dtype``, with SDTM applied unless ``job.sdtm`` is None and the step cache ``job.cache`` unless
    None."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from ..core.patch import apply_sdtm

    if job.ranks.rank != 0:
        diffusers_logging.disable_progress_bar()
    with warnings.catch_warnings():
        # Newer diffusers prefer ``dtype=``; older ones only know ``torch_dtype=``.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipeline_class = getattr(diffusers, job.pipeline)
        try:
            pipe = pipeline_class.from_pretrained(job.model, torch_dtype=job.dtype, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load a {job.pipeline} from {job.model!r}: {error}") from None
    missing = [name for name in job.family.text_components if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"the {job.pipeline} loaded from {job.model!r} has no {', '.join(missing)}; sdtm generate "
                         "needs the text encoders to embed the prompts.")
    cast_components(pipe, job.dtype)
    # float16 runs on the CPU with this torch (the tests generate with it); no need for diffusers' warning.
    pipe.to(job.device, silence_dtype_warnings=True)
    pipe.set_progress_bar_config(disable=True)
    if job.sdtm is not None:
        apply_sdtm(pipe, job.sdtm)
    if job.cache is not None:
        from .caches import apply_cache

        pipe._sdtm_step_cache = apply_cache(job.cache, pipe, job.steps)
    return pipe


def cast_components(pipe: Any, dtype: torch.dtype) -> None:
    """Put every floating-point parameter and buffer of the pipeline's torch modules in ``dtype``.

    ``from_pretrained(torch_dtype=...)`` does not guarantee it: without ``accelerate``, diffusers loads a
    checkpoint by assigning its tensors (keeping the checkpoint's dtype) whenever the model's first
    state-dict entry already has the checkpoint's dtype; where that first entry is a buffer always built in
    float32 (a positional table, say), a float32 checkpoint leaves the whole transformer in float32.
    Tensors that a model keeps in float32 on purpose (``_keep_in_fp32_modules``, e.g. T5's ``wo`` under
    float16; ``_keep_in_fp32_modules_strict``) stay as loaded. Raises ValueError if anything else is
    left in another dtype."""
    stray = []
    for name, component in _torch_components(pipe):
        kept = _kept_in_float32(component, dtype)
        for prefix, module in component.named_modules():
            for key, param in module.named_parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype and not kept(_join(prefix, key)):
                    param.data = param.data.to(dtype)
            for key, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != dtype and not kept(_join(prefix, key)):
                    module._buffers[key] = buffer.to(dtype)
        stray += [f"{name}.{key} ({tensor.dtype})" for key, tensor in _floating_tensors(component)
                  if tensor.dtype != dtype and not (tensor.dtype == torch.float32 and kept(key))]
    if stray:
        raise ValueError(f"{len(stray)} tensor(s) of the pipeline are not in {dtype} after loading, e.g. "
                         f"{', '.join(stray[:3])}.")


def _torch_components(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    return [(name, c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]


def _floating_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return [(key, tensor) for key, tensor in tensors if tensor.is_floating_point()]


def _kept_in_float32(component: torch.nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """A test of whether a tensor (by qualified name) of ``component`` is one the model keeps in float32
    under ``dtype``, matched by name as transformers and diffusers match these lists."""
    patterns: list[str] = []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(component, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        patterns += list(getattr(component, "_keep_in_fp32_modules", None) or [])
    return lambda name: any(pattern in name for pattern in patterns)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def read_manifest(out: str) -> dict:
    """The manifest in ``out`` ({} if none); raises ValueError if it is not a manifest: not strict JSON,
    a record list that is not a list, a record that is not an object with a string ``file`` (a plain file
    name) and ``prompt``, integer ``seed`` / ``index``, numeric or null ``seconds`` / ``macs`` and an
    object ``settings`` where present, or a file listed twice."""
    path = os.path.join(out, MANIFEST_NAME)
    if not os.path.exists(path):
        return {}
    try:
        manifest = _read_json_object(path, strict=True)
    except ValueError as error:
        raise ValueError(f"{str(error).rstrip('.')}; move it away to start afresh.") from None
    if not isinstance(manifest.get("settings", {}), dict):
        raise ValueError(f"{path} is not a manifest ('settings' is not an object); move it away to start afresh.")
    files: set[str] = set()
    for key in _RECORD_LISTS:
        records = manifest.get(key, [])
        if not isinstance(records, list):
            raise ValueError(f"{path} is not a manifest ({key!r} is not a list); move it away to start afresh.")
        for number, record in enumerate(records):
            problem = _record_problem(record, files)
            if problem:
                raise ValueError(f"{path}: {key}[{number}] {_cut(json.dumps(record, ensure_ascii=False), 80)} "
                                 f"{problem}; move the manifest away to start afresh.")
            files.add(record["file"])
    return manifest


def _record_problem(record: Any, files: set[str]) -> str | None:
    """What is wrong with one manifest record (None if nothing); ``files``: the file names seen before."""
    if not isinstance(record, dict):
        return "is not an object"
    for key in ("file", "prompt"):
        if not isinstance(record.get(key), str):
            return f"needs a string {key!r}, got {_json_type(record.get(key), key in record)}"
    name = record["file"]
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        return "names a 'file' that is not a plain file name"
    if name in files:
        return f"lists {name!r} a second time"
    for key in ("seed", "index"):
        if key in record and (isinstance(record[key], bool) or not isinstance(record[key], int)):
            return f"needs an integer {key!r}, got {_json_type(record[key], True)}"
    for key in ("seconds", "macs"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"needs a number or null as {key!r}, got {_json_type(value, True)}"
    if not isinstance(record.get("settings", {}), dict):
        return f"needs an object as 'settings', got {_json_type(record['settings'], True)}"
    return None


def _json_type(value: Any, present: bool) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__) if present else "nothing"


def manifest_bytes(job: Job, records: dict[int, dict], others: list[dict] | None = None) -> bytes:
    """The manifest (strict JSON, UTF-8): the settings, ``records`` in prompt-list order and ``others``
    (records of earlier images outside the prompt list); raises ValueError if a value cannot be written."""
    manifest: dict[str, Any] = {"settings": job.settings(), "images": [records[i] for i in sorted(records)]}
    if others:
        manifest["other_images"] = others
    return (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_manifest(job: Job, records: dict[int, dict], others: list[dict] | None = None) -> None:
    """Write ``OUT/manifest.json`` (atomically), see ``manifest_bytes``; raises OutputError if it cannot."""
    data = manifest_bytes(job, records, others)
    write_atomically(os.path.join(job.out, MANIFEST_NAME), lambda f: f.write(data))


def write_atomically(path: str, write: Callable[[Any], Any]) -> None:
    """Call ``write`` on a binary file object of a new temporary file next to ``path`` (a hidden
    ``.<name>.<12 hex>.tmp``), then rename it to ``path``; on failure the temporary file is removed, and
    an OSError becomes an OutputError naming ``path``."""
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise OutputError(path, error) from error
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        try:
            os.remove(temp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise OutputError(path, error) from error
        raise


def _generate(job: Job, pipe: Any, pending: list[int]) -> Iterator[dict[int, dict]]:
    """Generate the images of ``pending`` (prompt indices) in batches of ``job.batch_size``, write each
    PNG, and yield the records of each finished batch."""
    from tqdm import tqdm

    batches = [pending[i:i + job.batch_size] for i in range(0, len(pending), job.batch_size)]
    for batch in tqdm(batches, desc="sdtm generate", unit="batch", disable=job.ranks.rank != 0 or not batches):
        seeds = [job.seed + i for i in batch]
        generators = [torch.Generator(job.device).manual_seed(seed) for seed in seeds]
        start = time.perf_counter()
        result = pipe(prompt=[job.prompts[i].text for i in batch], num_inference_steps=job.steps,
                      height=job.height, width=job.width, generator=generators, **pipeline_kwargs(job))
        outputs = job.family.outputs(result)
        seconds = (time.perf_counter() - start) / len(batch)
        records = {}
        for index, output in zip(batch, outputs):
            write_atomically(job.path(index), lambda f, output=output: job.family.save_output(output, f))
            records[index] = job.record(index, seconds)
        yield records


def pipeline_kwargs(job: Job) -> dict:
    """The family's arguments of a pipeline call besides prompts, size, steps and generators
    (``ModelAdapter.generate_call_kwargs``): the guidance (none where the model takes none; no negative
    prompt is passed to any family) and the family's switches."""
    return job.family.generate_call_kwargs(job.guidance, job.frames)


def check_existing_images(job: Job, previous: dict) -> None:
    """Refuse (ValueError) a PNG of the prompt list that exists but is not a file, and PNGs whose record
    in the previous manifest (looked up by file name) names another prompt text or seed than the prompt
    they now stand for: keeping them would label an image with a prompt it was not made from."""
    by_file = _records_by_file(previous)
    mismatches = []
    for index in range(len(job.prompts)):
        path = job.path(index)
        if not os.path.exists(path):
            continue
        if not os.path.isfile(path):
            raise ValueError(f"{path} exists and is not a file; move it away.")
        old = by_file.get(job.file(index))
        if old is not None and (old["prompt"], old.get("seed")) != (job.prompts[index].text, job.seed + index):
            mismatches.append((index, old))
    if not mismatches:
        return
    index, old = mismatches[0]
    old_seed = old.get("seed", "unknown")
    raise ValueError(
        f"{job.path(index)} was made from prompt {_shorten(old['prompt'])} (seed {old_seed}) but now stands for "
        f"prompt {_shorten(job.prompts[index].text)} (seed {job.seed + index}); {len(mismatches)} existing "
        f"image(s) in {job.out} do not match the prompt list and seeds (image i uses --seed + i); use a new --out "
        "or delete those images.")


def _records_by_file(previous: dict) -> dict[str, dict]:
    """The previous manifest's records (``images`` and ``other_images``) by file name; ``settings`` of
    each: the image-changing settings it was made with where known (its own, else the manifest's)."""
    top = previous.get("settings") or {}
    known = {key: top[key] for key in _SETTINGS_THAT_CHANGE_IMAGES if key in top}
    by_file = {}
    for key in _RECORD_LISTS:
        for record in previous.get(key, []):
            made_with = record.get("settings", known)
            by_file[record["file"]] = dict(record, settings=made_with)
    return by_file


def _with_settings(record: dict, made_with: dict, job: Job) -> dict:
    """``record`` with ``settings``: ``made_with`` if it differs from this run's, else none."""
    current = job.image_settings()
    record = {key: value for key, value in record.items() if key != "settings"}
    if any(current.get(key) != value for key, value in made_with.items()):
        record["settings"] = made_with
    return record


def _kept_records(job: Job, previous: dict, existing: set[int]) -> dict[int, dict]:
    """Records of the prompts whose PNG existed at the start (``existing``, already checked against the
    previous manifest): made from the prompt list, with the timing of the previous record for the same
    file if there is one, and ``settings`` if that image was made with other settings."""
    by_file = _records_by_file(previous)
    kept = {}
    for index in sorted(existing):
        old = by_file.get(job.file(index))
        if old is None:
            kept[index] = job.record(index, None)
        else:
            record = job.record(index, old.get("seconds"), old.get("macs"))
            kept[index] = _with_settings(record, old["settings"], job)
    return kept


def _other_records(job: Job, previous: dict) -> list[dict]:
    """Records of the previous manifest for PNGs that still exist in OUT but that this prompt list does
    not produce (kept so a later run can check them), sorted by file name."""
    ours = {job.file(index) for index in range(len(job.prompts))}
    others = []
    for name, record in sorted(_records_by_file(previous).items()):
        if name not in ours and name.endswith(job.family.output_suffix) and os.path.isfile(os.path.join(job.out, name)):
            carried = {key: value for key, value in record.items() if key != "index"}
            others.append(_with_settings(carried, record["settings"], job))
    return others


def _warn_on_changed_settings(job: Job, kept: dict[int, dict]) -> None:
    """Warn when kept images were made with other image-changing settings than this run's."""
    new = job.image_settings()
    made_with = [record["settings"] for record in kept.values() if "settings" in record]
    if not made_with:
        return
    changed = dict.fromkeys(change for old in made_with for change in _changes(old, new))
    details = f" ({'; '.join(changed)})" if changed else ""
    print(f"sdtm generate: warning: {len(made_with)} existing image(s) in {job.out} were made with other "
          f"settings{details}; they are kept and their records in {MANIFEST_NAME} list those settings; "
          "delete them to regenerate.", file=sys.stderr)


def _changes(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for each setting of ``old`` that ``new`` sets otherwise (``sdtm.<field>`` inside
    the SDTM settings)."""
    changes = []
    for key, value in old.items():
        if key not in new or value == new[key]:
            continue
        if isinstance(value, dict) and isinstance(new[key], dict):
            changes += [f"{key}.{k} {value.get(k)!r} -> {new[key].get(k)!r}"
                        for k in sorted(set(value) | set(new[key])) if value.get(k) != new[key].get(k)]
        else:
            changes.append(f"{key} {value!r} -> {new[key]!r}")
    return changes


def _shorten(text: str, length: int = _QUOTED_PROMPT_LENGTH) -> str:
    """``text`` quoted, cut to ``length`` characters."""
    return repr(_cut(text, length))


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length - 3] + "..."


@contextmanager
def _process_group(job: Job) -> Iterator[None]:
    """torch.distributed for the run's duration under torchrun (NCCL on CUDA, gloo otherwise)."""
    if not job.ranks.distributed:
        yield
        return
    import torch.distributed as dist

    cuda = job.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(job.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _remove_stale_temps(out: str, names: set[str]) -> None:
    """Remove temporary files an interrupted run left for ``names`` (files only this process writes);
    raises OutputError if one cannot be removed."""
    try:
        entries = os.listdir(out)
    except OSError as error:
        raise OutputError(out, error, action="list") from error
    for entry in entries:
        match = _TEMP_NAME.match(entry)
        if match and match.group(1) in names:
            path = os.path.join(out, entry)
            try:
                os.remove(path)
            except OSError as error:
                raise OutputError(path, error, action="remove") from error


class _NonStandardJSON(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise _NonStandardJSON(f"{name} is not standard JSON")


def _read_json_object(path: str, strict: bool = False) -> dict:
    """The JSON object in ``path``; ``strict``: NaN and Infinity are refused too. Raises ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, parse_constant=_reject_constant if strict else None)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, _NonStandardJSON) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return data


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer.") from None


if __name__ == "__main__":
    sys.exit(main())
