"""``sdtm generate``: images from a local diffusers SD3 / SD3.5 folder, with or without SDTM.

One PNG per prompt, ``OUT/<stem>.png`` (the stem is the prompt's id made safe, see ``sdtm.prompts``), and
``OUT/manifest.json``::

    {"settings": {"model", "prompts", "steps", "height", "width", "guidance", "batch_size", "seed",
                  "dtype", "device", "world_size", "sdtm": {...} or null},
     "images": [{"index", "id", "prompt", "seed", "file", "seconds", "macs"}, ...]}   # prompt-list order

Image ``i`` of the prompt list starts from the noise of seed ``--seed + i``; before each pipeline call
torch's global RNG (from which SDTM forks its random window destinations) is seeded with the seed of
the batch's first image. With ``--batch-size 1`` every image is therefore the same whatever the sharding
or resuming; larger batches share SDTM's random draws within a batch. ``seconds`` is the batch's wall
time divided by its size; ``macs`` is null (not measured).

Resuming: a prompt whose PNG exists is skipped and keeps its previous manifest entry. PNGs and the
manifest are written to a temporary file in OUT and renamed, so an interrupted run leaves only finished
files; the manifest is rewritten after every batch.

Several processes: under ``torchrun --nproc_per_node=N`` (RANK / WORLD_SIZE / LOCAL_RANK set) prompt ``i``
goes to rank ``i % N``, CUDA ranks use ``cuda:LOCAL_RANK`` (NCCL), CPU ranks gloo; rank 0 writes the
manifest (after each of its own batches, then once more with every rank's records gathered).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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

from .cli_options import add_sdtm_options, config_from_args, positive_int
from .config import SDTMConfig
from .prompts import Prompt, load_prompts, single_prompt

MANIFEST_NAME = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Ranks that finish early wait at the final gather for the slowest one, possibly for hours.
COLLECTIVE_TIMEOUT = datetime.timedelta(days=7)
_TEMP_NAME = re.compile(r"^\.(.+)\.[0-9a-f]{12}\.tmp$")
_SETTINGS_THAT_CHANGE_IMAGES = ("model", "steps", "height", "width", "guidance", "seed", "dtype", "sdtm")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns it."""
    parser = subparsers.add_parser(
        "generate", help="generate images from a local SD3 / SD3.5 diffusers folder (resumable, torchrun)",
        description="Loads a local diffusers SD3 / SD3.5 folder offline, writes one PNG per prompt and "
                    "OUT/manifest.json, skips prompts whose PNG exists, and shards the prompts across "
                    "torchrun processes. Image i of the prompt list uses seed --seed + i.")
    configure_parser(parser)
    return parser


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``generate`` to ``parser``."""
    parser.add_argument("--model", required=True, metavar="DIR", help="local diffusers SD3 / SD3.5 folder")
    parser.add_argument("--prompt", metavar="TEXT", help="one prompt (id 00000); or use --prompts")
    parser.add_argument("--prompts", metavar="FILE",
                        help=".txt (one prompt a line), .json (list of strings or objects, COCO captions) or "
                             ".jsonl (one object a line); objects: caption/prompt/text and image_id/id")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--steps", type=positive_int, default=28, help="denoising steps (default 28)")
    parser.add_argument("--height", type=positive_int, default=1024, help="pixels (default 1024)")
    parser.add_argument("--width", type=positive_int, default=1024, help="pixels (default 1024)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="prompts per pipeline call (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="image i of the prompt list uses seed + i (default 0)")
    parser.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7.0)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="model dtype (default float16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    add_sdtm_options(parser)


def main(argv: list[str] | None = None) -> int:
    """``python -m sdtm.generate ...``: the same options as ``sdtm generate``."""
    parser = argparse.ArgumentParser(prog="python -m sdtm.generate",
                                     description="sdtm generate: images from a local SD3 / SD3.5 diffusers folder.")
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


@dataclass(frozen=True)
class Job:
    """Validated settings of one run."""

    model: str
    prompts_file: str | None
    prompts: list[Prompt]
    out: str
    steps: int
    height: int
    width: int
    batch_size: int
    seed: int
    guidance: float
    dtype: torch.dtype
    device: torch.device
    sdtm: SDTMConfig | None
    ranks: Ranks

    def path(self, index: int) -> str:
        return os.path.join(self.out, self.file(index))

    def file(self, index: int) -> str:
        return self.prompts[index].stem + ".png"

    def settings(self) -> dict:
        return {
            "model": self.model, "prompts": self.prompts_file, "steps": self.steps, "height": self.height,
            "width": self.width, "guidance": self.guidance, "batch_size": self.batch_size, "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "world_size": self.ranks.world_size,
            "sdtm": dataclasses.asdict(self.sdtm) if self.sdtm is not None else None,
        }

    def record(self, index: int, seconds: float | None) -> dict:
        prompt = self.prompts[index]
        return {"index": index, "id": prompt.id, "prompt": prompt.text, "seed": self.seed + index,
                "file": self.file(index), "seconds": seconds, "macs": None}


def run(args: argparse.Namespace) -> int:
    """Generate every missing image of the prompt list; returns the exit code (2: bad arguments or files,
    after one line ``sdtm generate: <reason>`` on stderr, from rank 0 only under torchrun since every rank
    checks the same arguments)."""
    rank = 0
    try:
        ranks = ranks_from_env()
        rank = ranks.rank
        job = job_from_args(args, ranks)
        previous = read_manifest(job.out)
    except ValueError as error:
        return _usage_error(error, show=rank == 0)
    mine = list(range(ranks.rank, len(job.prompts), ranks.world_size))
    pending = [i for i in mine if not os.path.exists(job.path(i))]
    try:
        pipe = load_pipeline(job) if pending else None
    except ValueError as error:
        return _usage_error(error, show=True, prefix=f"rank {rank}: " if ranks.distributed else "")
    _remove_stale_temps(job.out, {job.file(i) for i in mine} | ({MANIFEST_NAME} if rank == 0 else set()))
    with _process_group(job):
        records = _kept_records(job, previous) if rank == 0 else {}
        if rank == 0:
            _warn_on_changed_settings(job, previous)
        new: dict[int, dict] = {}
        for batch_records in _generate(job, pipe, pending):
            new.update(batch_records)
            if rank == 0:
                records.update(batch_records)
                write_manifest(job, records)
        if ranks.distributed:
            import torch.distributed as dist

            gathered: list[dict[int, dict]] | None = [{} for _ in range(ranks.world_size)] if rank == 0 else None
            dist.gather_object(new, gathered, dst=0)
            for part in gathered or []:
                records.update(part)
        if rank == 0:
            write_manifest(job, records)
    return 0


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
    vae_scale, patch_size, max_grid = model_geometry(args.model)
    check_size(args.height, args.width, vae_scale, patch_size, max_grid)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    prompts = single_prompt(args.prompt) if args.prompt is not None else load_prompts(args.prompts)
    if args.seed < 0 or args.seed + len(prompts) > 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63 - {len(prompts)}] for {len(prompts)} prompts, got {args.seed}.")
    try:
        sdtm = config_from_args(args)
    except TypeError as error:
        raise ValueError(str(error)) from None
    device = resolve_device(args.device, ranks)
    if sdtm is not None:
        from .ops import ops_for

        ops_for(sdtm.backend, device)  # raises ValueError if the backend cannot run on this device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create --out {args.out!r}: {error.strerror or error}.") from None
    return Job(model=os.path.abspath(args.model), prompts_file=args.prompts and os.path.abspath(args.prompts),
               prompts=prompts, out=out, steps=args.steps, height=args.height, width=args.width,
               batch_size=args.batch_size, seed=args.seed, guidance=args.guidance, dtype=dtype, device=device,
               sdtm=sdtm, ranks=ranks)


def model_geometry(model: str) -> tuple[int, int, int | None]:
    """(VAE down-sampling factor, transformer patch size, positional table side in tokens or None) of a
    diffusers SD3 folder, read from its config files."""
    if not os.path.isdir(model):
        raise ValueError(f"--model folder {model!r} does not exist.")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"--model {model!r} is not a diffusers pipeline folder (no model_index.json).")
    vae = _read_json_object(os.path.join(model, "vae", "config.json"))
    transformer = _read_json_object(os.path.join(model, "transformer", "config.json"))
    channels, patch_size = vae.get("block_out_channels"), transformer.get("patch_size")
    max_grid = transformer.get("pos_embed_max_size")
    if not isinstance(channels, list) or not channels or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"--model {model!r}: vae/config.json needs block_out_channels and transformer/config.json "
                         "a patch_size; is this an SD3 / SD3.5 folder?")
    return 2 ** (len(channels) - 1), patch_size, max_grid if isinstance(max_grid, int) else None


def check_size(height: int, width: int, vae_scale: int, patch_size: int, max_grid: int | None) -> None:
    """Height and width must be positive multiples of vae_scale * patch_size whose token grid fits the
    positional table (``max_grid`` tokens a side)."""
    multiple = vae_scale * patch_size
    if height < 1 or width < 1 or height % multiple or width % multiple:
        raise ValueError(f"--height and --width must be positive multiples of {multiple} for this model "
                         f"(VAE factor {vae_scale} x patch {patch_size}), got {height}x{width}.")
    grid_h, grid_w = height // multiple, width // multiple
    if max_grid is not None and max(grid_h, grid_w) > max_grid:
        raise ValueError(f"{height}x{width} needs a {grid_h}x{grid_w} token grid but the model's positional table "
                         f"covers {max_grid}x{max_grid} tokens (at most {max_grid * multiple} pixels a side).")


def resolve_device(requested: str | None, ranks: Ranks) -> torch.device:
    """The device to run on: ``requested`` or cuda/cpu; under torchrun a CUDA device is cuda:LOCAL_RANK."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1).") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine.")
    if ranks.distributed:
        device = torch.device("cuda", ranks.local_rank)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{device} does not exist: {torch.cuda.device_count()} CUDA device(s).")
    return device


def load_pipeline(job: Job) -> Any:
    """The StableDiffusion3Pipeline of ``job.model`` (local files only) on ``job.device`` in ``job.dtype``,
    with SDTM applied unless ``job.sdtm`` is None."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    from .patch import apply_sdtm

    if job.ranks.rank != 0:
        diffusers_logging.disable_progress_bar()
    with warnings.catch_warnings():
        # Newer diffusers prefer ``dtype=``; older ones only know ``torch_dtype=``.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(job.model, torch_dtype=job.dtype, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load a StableDiffusion3Pipeline from {job.model!r}: {error}") from None
    pipe.to(job.device)
    pipe.set_progress_bar_config(disable=True)
    if job.sdtm is not None:
        apply_sdtm(pipe, job.sdtm)
    return pipe


def read_manifest(out: str) -> dict:
    """The manifest in ``out`` ({} if none); raises ValueError if it is not a manifest."""
    path = os.path.join(out, MANIFEST_NAME)
    if not os.path.exists(path):
        return {}
    manifest = _read_json_object(path)
    if not isinstance(manifest.get("images", []), list):
        raise ValueError(f"{path} is not a manifest ('images' is not a list); move it away to start afresh.")
    return manifest


def write_manifest(job: Job, records: dict[int, dict]) -> None:
    """Write ``OUT/manifest.json`` (atomically): the settings and ``records`` in prompt-list order."""
    manifest = {"settings": job.settings(), "images": [records[i] for i in sorted(records)]}
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomically(os.path.join(job.out, MANIFEST_NAME), lambda f: f.write(data))


def write_atomically(path: str, write: Callable[[Any], Any]) -> None:
    """Call ``write`` on a binary file object of a new temporary file next to ``path`` (a hidden
    ``.<name>.<12 hex>.tmp``), then rename it to ``path``; on failure the temporary file is removed."""
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _generate(job: Job, pipe: Any, pending: list[int]) -> Iterator[dict[int, dict]]:
    """Generate the images of ``pending`` (prompt indices) in batches of ``job.batch_size``, write each
    PNG, and yield the records of each finished batch."""
    from tqdm import tqdm

    batches = [pending[i:i + job.batch_size] for i in range(0, len(pending), job.batch_size)]
    for batch in tqdm(batches, desc="sdtm generate", unit="batch", disable=job.ranks.rank != 0 or not batches):
        seeds = [job.seed + i for i in batch]
        torch.manual_seed(seeds[0])  # SDTM forks its random window destinations from torch's RNG
        generators = [torch.Generator(job.device).manual_seed(seed) for seed in seeds]
        start = time.perf_counter()
        images = pipe(prompt=[job.prompts[i].text for i in batch], num_inference_steps=job.steps,
                      height=job.height, width=job.width, guidance_scale=job.guidance, generator=generators).images
        seconds = (time.perf_counter() - start) / len(batch)
        records = {}
        for index, image in zip(batch, images):
            write_atomically(job.path(index), lambda f, image=image: image.save(f, format="PNG"))
            records[index] = job.record(index, seconds)
        yield records


def _kept_records(job: Job, previous: dict) -> dict[int, dict]:
    """Records of the prompts whose PNG exists: the previous manifest's entry for the same file if there
    is one (re-indexed), else a record without timing."""
    by_file = {r.get("file"): r for r in previous.get("images", []) if isinstance(r, dict)}
    kept = {}
    for index in range(len(job.prompts)):
        if os.path.exists(job.path(index)):
            old = by_file.get(job.file(index))
            kept[index] = dict(old, index=index) if old is not None else job.record(index, None)
    return kept


def _warn_on_changed_settings(job: Job, previous: dict) -> None:
    old = previous.get("settings")
    if not isinstance(old, dict):
        return
    new = job.settings()
    changed = []
    for key in _SETTINGS_THAT_CHANGE_IMAGES:
        if key not in old or old[key] == new[key]:
            continue
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            changed += [f"{key}.{k} {old[key].get(k)!r} -> {new[key].get(k)!r}"
                        for k in sorted(set(old[key]) | set(new[key])) if old[key].get(k) != new[key].get(k)]
        else:
            changed.append(f"{key} {old[key]!r} -> {new[key]!r}")
    if changed:
        print(f"sdtm generate: warning: {os.path.join(job.out, MANIFEST_NAME)} was written with other settings "
              f"({'; '.join(changed)}); existing images are kept, delete them to regenerate.", file=sys.stderr)


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
    """Remove temporary files an interrupted run left for ``names`` (files only this process writes)."""
    for entry in os.listdir(out):
        match = _TEMP_NAME.match(entry)
        if match and match.group(1) in names:
            os.remove(os.path.join(out, entry))


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
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
