"""Image files out: where each image of a call goes (planned and checked before any work), how it
is encoded (PNG with A1111's `parameters` text chunk; JPEG/WebP with it in EXIF UserComment, where
A1111 puts it), and writing it without ever clobbering a file the user did not ask to replace."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import __version__
from .errors import SdtrtError
from .files import atomic_file, check_can_write

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def a1111_parameters(p: Mapping[str, Any]) -> str:
    """The text A1111 writes into its images, which many tools read back. A1111 counts clip skip from 1
    (no skip); diffusers' clip_skip=k is A1111's k + 1."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    clip_skip = p.get("clip_skip")
    fields = [("Steps", p.get("steps")), ("Sampler", p.get("sampler")), ("CFG scale", p.get("guidance_scale")),
              ("Seed", p.get("seed")), ("Size", f"{p.get('width')}x{p.get('height')}"), ("Model hash", p.get("model_hash")),
              ("Clip skip", clip_skip + 1 if clip_skip else None), ("Denoising strength", p.get("strength")),
              ("Noise level", p.get("noise_level")),
              ("Lora hashes", _hashes(p.get("loras"))), ("TI hashes", _hashes(p.get("embeddings"))),
              ("Version", f"sdtrt {__version__}")]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def _hashes(items) -> str | None:
    """A1111's `"name: hash, ..."` (first 12 hex digits of each file's sha256)."""
    return '"' + ", ".join(f"{name}: {sha[:12]}" for name, sha in items) + '"' if items else None


def encode(image, fmt: str = "PNG", parameters: str | None = None, quality: int = 95) -> bytes:
    """Image file bytes with the parameters embedded."""
    buf = io.BytesIO()
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        from PIL import Image

        exif = Image.Exif()
        if parameters:  # EXIF UserComment in the Exif IFD, "UNICODE" + UTF-16BE, as A1111 writes it (via piexif)
            exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")
        image.convert("RGB").save(buf, format=fmt, quality=quality, exif=exif.tobytes())
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where a call's images go: fixed names (a file path) or numbered in a folder."""

    paths: tuple[Path, ...] | None  # explicit names, or None for numbered files in `folder`
    folder: Path | None
    fmt: str
    force: bool

    def write(self, images: Sequence, parameters: Sequence[str], quality: int = 95) -> list[Path]:
        written = []
        for i, (image, text) in enumerate(zip(images, parameters)):
            data = encode(image, self.fmt, text, quality)
            if self.paths is not None:
                with atomic_file(self.paths[i], force=self.force) as tmp:
                    tmp.write_bytes(data)
                written.append(self.paths[i])
            else:
                written.append(_write_numbered(self.folder, self.fmt, data))
        return written


def plan(out: str, count: int, force: bool = False, fmt: str | None = None) -> Plan:
    """Decide and check every output path before any work: a folder (ending in / or existing) gets
    numbered files after the ones already there; a file path gets that name (several images:
    NAME-0.png, NAME-1.png ...). Existing files are refused unless `force`."""
    path = Path(out)
    as_folder = out.endswith(("/", "\\")) or path.is_dir()
    if as_folder:
        fmt = _format(fmt or "png", "--format")
        check_can_write(path / "image.png")
        return Plan(None, path, fmt, force)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise SdtrtError(f"--out {out}: sdtrt writes {', '.join(sorted(FORMATS))} files, not '{path.suffix or 'no suffix'}'.",
                         f"name the file {path.with_suffix('.png').name}, or end --out with / for a folder of numbered images")
    if fmt is not None and _format(fmt, "--format") != FORMATS[suffix]:
        raise SdtrtError(f"--format {fmt} contradicts --out {out}.", f"drop --format, or name the file with .{fmt.lower()}")
    paths = (path,) if count == 1 else tuple(path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count))
    for p in paths:
        if p.is_dir():
            raise SdtrtError(f"--out {p} is a directory.", f"end --out with / to write numbered images into it ({p}/)")
        if p.exists() and not force:
            raise SdtrtError(f"{p} already exists.", "choose another --out, pass --force to replace it, or give a folder (ending in /) for numbered images")
    check_can_write(paths[0])
    return Plan(paths, None, FORMATS[suffix], force)


def _format(name: str, flag: str) -> str:
    key = "." + name.lower().lstrip(".")
    if key not in FORMATS:
        raise SdtrtError(f"{flag} {name} is not an image format sdtrt writes.", f"pass {flag} png, jpg or webp")
    return FORMATS[key]


_NUMBERED = re.compile(r"^image-(\d+)\.(png|jpe?g|webp)$")


def _write_numbered(folder: Path, fmt: str, data: bytes) -> Path:
    """folder/image-N.ext with N after every existing image-*; never replaces a file, even one another
    process wrote a moment ago (the name is claimed with link(), which fails if it exists)."""
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    n = max((int(m.group(1)) + 1 for p in folder.iterdir() if (m := _NUMBERED.match(p.name))), default=0)
    for attempt in range(1000):
        target = folder / f"image-{n + attempt}.{ext}"
        if target.exists():
            continue
        try:
            with atomic_file(target, force=False) as tmp:
                tmp.write_bytes(data)
            return target
        except SdtrtError:
            continue  # another writer took this number first
    raise SdtrtError(f"could not find a free image number in {folder}.", "write into another folder")
