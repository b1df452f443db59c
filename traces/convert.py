"""Re-compress a trace: `python -m traces convert IN OUT [--portable] [--overwrite]`.

`--portable` writes gzip + shuffle wherever the trace uses Blosc, so plain h5py, h5dump and
HDFView open it without hdf5plugin (about 25% larger routing, slower reads); without it the
schema's default filters are restored. Everything else is copied as it is: attributes,
chunk shapes, fill values, unwritten chunks (left unallocated), dimension scales. Convert a
finished or killed trace: one whose writer still runs on this host (`writer_pid`, see
`TraceReader.live`) is refused, since its copy would be a snapshot that stays incomplete and
reads as live while that writer runs. OUT that is IN (symlinks and hard links resolved) is
refused, --overwrite or not. The output is written to a temporary file beside OUT and
renamed, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py

from cli_common.command import Parser, run_main
from cli_common.outputs import OutputError, check_free_space, check_output, os_error_reason

from .compression import PORTABLE_FILTER, chosen_filter, filter_kwargs
from .errors import TraceError
from .reader import open_trace
from .schema import FLOATS, LIBVER, find

# Dimension-scale bookkeeping attributes: recreated by make_scale/attach_scale, never copied.
_SCALE_ATTRS = {"DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME"}


def convert_trace(src: str | os.PathLike, dst: str | os.PathLike, portable: bool = True,
                  overwrite: bool = False) -> Path:
    """Copy trace `src` to `dst` with portable (gzip) or default (Blosc) compression."""
    src, dst = Path(src), Path(dst)
    check_output(dst, overwrite, flag="OUT", inputs={"IN": src})  # refused even with overwrite
    with open_trace(src) as trace:
        if trace.live:
            raise TraceError(f"{src} is still being written (its writer, process {trace.attrs['writer_pid']}, "
                             f"runs); convert it once the recording ends or is stopped (a killed trace converts)")
        # gzip may grow Blosc data by about a quarter; the temporary copy needs it all before the rename
        check_free_space(dst, int(src.stat().st_size * 1.3), f"the converted copy of {src}")
        h5 = trace.file
        items: list[tuple[str, h5py.Group | h5py.Dataset]] = []
        h5.visititems(lambda name, obj: items.append(("/" + name, obj)))
        joined = [name for name, obj in items if isinstance(obj, h5py.Dataset) and obj.is_virtual]
        if joined:
            raise TraceError(f"{src} is a joined trace (virtual datasets over rank files); convert the "
                             f"rank files and join the converted ones")
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(tmp, "w", libver=LIBVER) as out:
                _copy_attrs(h5, out)
                for name, obj in items:
                    if isinstance(obj, h5py.Group):
                        _copy_attrs(obj, out.require_group(name))
                    else:
                        _copy_dataset(obj, out, name, _target_filter(trace.kind, name, obj, portable))
                _rebuild_scales(h5, out, items)
            os.replace(tmp, dst)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"writing {dst} failed ({os_error_reason(e)}); nothing was written") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dst


def _target_filter(kind: str, name: str, d: h5py.Dataset, portable: bool) -> str:
    if d.id.get_create_plist().get_nfilters() == 0:
        return "none"
    spec = find(kind, name)
    return chosen_filter(spec.filter if spec is not None else FLOATS, portable)


def _copy_dataset(d: h5py.Dataset, out: h5py.File, name: str, filter_name: str) -> None:
    fill = None if d.dtype.kind == "O" else d.fillvalue
    new = out.create_dataset(name, shape=d.shape, maxshape=d.maxshape if d.chunks else None, dtype=d.dtype,
                             chunks=d.chunks, fillvalue=fill, **filter_kwargs(filter_name))
    if d.chunks is None:
        if d.size:
            new[...] = d[...]
    else:
        # only the chunks the writer allocated: unwritten cells stay unallocated and read as fill
        for i in range(d.id.get_num_chunks()):
            offset = d.id.get_chunk_info(i).chunk_offset
            cell = tuple(slice(o, min(o + c, n)) for o, c, n in zip(offset, d.chunks, d.shape))
            new[cell] = d[cell]
    _copy_attrs(d, new)


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    for key in src.attrs:
        if key not in _SCALE_ATTRS:
            dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)


def _rebuild_scales(h5: h5py.File, out: h5py.File, items: list) -> None:
    """Same dimension scales, labels and attachments as the source."""
    datasets = [(name, d) for name, d in items if isinstance(d, h5py.Dataset)]
    for name, d in datasets:
        if h5py.h5ds.is_scale(d.id):
            out[name].make_scale(h5py.h5ds.get_scale_name(d.id).decode())
    for name, d in datasets:
        if h5py.h5ds.is_scale(d.id):
            continue
        for i, dim in enumerate(d.dims):
            if dim.label:
                out[name].dims[i].label = dim.label
            for scale in dim.values():
                out[name].dims[i].attach_scale(out[scale.name])


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m traces convert", description=__doc__.splitlines()[0], version=True)
    ap.add_argument("input", type=Path, metavar="IN", help="a finished or killed trace (one still being written "
                    "is refused; a joined trace: convert its rank files)")
    ap.add_argument("output", type=Path, metavar="OUT", help="the converted copy (refused if it is IN)")
    ap.add_argument("--portable", action="store_true",
                    help=f"{PORTABLE_FILTER} instead of Blosc: readable without hdf5plugin")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT (never IN)")

    def body() -> str:
        args = ap.parse_args(argv)
        out = convert_trace(args.input, args.output, portable=args.portable, overwrite=args.overwrite)
        sizes = [os.path.getsize(p) / 2**20 for p in (out, args.input)]
        return (f"wrote {out} ({'portable gzip' if args.portable else 'Blosc'}, {sizes[0]:.2f} MiB; "
                f"input {sizes[1]:.2f} MiB)")

    return run_main(lambda: print(body()))


if __name__ == "__main__":
    sys.exit(main())
