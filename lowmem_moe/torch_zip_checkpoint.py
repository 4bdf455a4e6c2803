"""Locate the tensors of a PyTorch zip checkpoint (``pytorch_model.bin``) as byte ranges of the file.

torch.save (torch >= 1.6) writes a zip archive with one top-level folder:
``<archive>/data.pkl`` pickles the state dict, ``<archive>/data/<key>``
contains the raw bytes of each storage, stored without compression, and
``<archive>/byteorder`` records the byte order. The zip module reads only the
central directory and data.pkl. Each storage's data offset comes from its
local file header, so the merge can copy tensor bytes straight out of the
archive, as it does from safetensors files.
"""

import logging
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .dtypes import ITEM_SIZES
from .errors import SourceError
from .safetensors_header import TensorEntry
from .torch_pickle import TensorRecord, read_tensor_records

logger = logging.getLogger(__name__)

# data.pkl of a 70B-parameter model is a few MB. The limit stops a corrupt or
# hostile size field from making us read gigabytes into memory.
MAX_PICKLE_BYTES = 512 * 2**20

PICKLE_NAME = "data.pkl"
BYTEORDER_NAME = "byteorder"
STORAGE_FOLDER = "data/"

# The fixed part of a zip local file header (APPNOTE.TXT 4.3.7): signature,
# version, flags, method, time, date, CRC-32, compressed size, size, name
# length, extra field length. 30 bytes.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED_FLAG = 0x1
_UTF8_NAME_FLAG = 0x800

# A pickle starts with the PROTO opcode. Legacy torch.save files (torch < 1.6)
# are a series of pickles, so they start with it too.
_PICKLE_PROTO = b"\x80"

_CONVERT_HINT = (
    "Convert it once with torch.save(torch.load(path, weights_only=True), path), which writes the zip format, "
    "or save the model as safetensors with transformers' save_pretrained."
)


@dataclass(frozen=True)
class TorchZipIndex:
    """The tensors of one PyTorch zip checkpoint, each located by absolute byte offset."""

    path: Path
    tensors: dict[str, TensorEntry]


@dataclass(frozen=True)
class _Member:
    """A storage's zip member: where its bytes start in the file and how many there are."""

    name: str
    data_start: int  # bytes from the start of the file
    size: int  # bytes


def read_torch_zip(path: Path) -> TorchZipIndex:
    """Locate every tensor of a torch.save zip file without loading tensor data or running pickle code.

    Raises:
        SourceError: the file is not a zip checkpoint, and the message says
            how to convert a legacy one. Also raised when data.pkl names a
            global that is not allowed, a storage is compressed or out of
            range, the data is big-endian, or a tensor is not contiguous.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            archive = _open_zip(path, handle)
            with archive:
                prefix, pickle_data = _read_pickle(path, archive)
                _check_byteorder(path, archive, prefix)
                records = read_tensor_records(pickle_data, path)
                members = {
                    key: _storage_member(path, handle, archive, prefix, key, file_size)
                    for key in dict.fromkeys(record.storage.key for record in records.values())
                }
    except OSError as error:
        raise SourceError(f"{path}: cannot read the PyTorch checkpoint: {error.strerror or error}.") from error

    # Sorted by name, as safetensors headers are, so that a merge writes the
    # same file whichever format the base comes in.
    tensors = {
        name: _tensor_entry(path, name, records[name], members[records[name].storage.key]) for name in sorted(records)
    }
    _log_dropped_attributes(path, records)
    return TorchZipIndex(path=path, tensors=tensors)


def _open_zip(path: Path, handle: BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(handle)
    except zipfile.BadZipFile as error:
        handle.seek(0)
        if handle.read(1) == _PICKLE_PROTO:
            raise SourceError(
                f"{path} is a PyTorch checkpoint in the legacy format of torch < 1.6, which lowmem-moe cannot "
                f"stream. {_CONVERT_HINT}"
            ) from error
        raise SourceError(
            f"{path} is not a zip archive, so it is not a PyTorch checkpoint written by torch.save. "
            f"The file may be damaged or in an older format. {_CONVERT_HINT}"
        ) from error


def _read_pickle(path: Path, archive: zipfile.ZipFile) -> tuple[str, bytes]:
    """Return the archive's folder prefix, such as ``"archive/"``, and the bytes of its data.pkl."""
    candidates = [
        info for info in archive.infolist() if info.filename.endswith("/" + PICKLE_NAME) and info.filename.count("/") == 1
    ]
    if len(candidates) != 1:
        found = ", ".join(info.filename for info in candidates) or "none"
        raise SourceError(
            f"{path}: expected exactly one <archive>/{PICKLE_NAME} in the zip file, found {found}. "
            "The file was not written by torch.save."
        )
    info = candidates[0]
    if info.file_size > MAX_PICKLE_BYTES:
        raise SourceError(
            f"{path}: {info.filename} is {info.file_size} bytes, more than the {MAX_PICKLE_BYTES} bytes that "
            "lowmem-moe reads. A state dict's pickle is a few MB, so the file is damaged or not a checkpoint."
        )
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise SourceError(f"{path}: {info.filename} is encrypted. Decrypt the checkpoint first.")
    try:
        with archive.open(info) as member:
            data = member.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as error:
        # zipfile raises NotImplementedError for unknown compression methods
        # and RuntimeError for encryption.
        raise SourceError(f"{path}: cannot read {info.filename}: {error}.") from error
    prefix = info.filename[: -len(PICKLE_NAME)]
    return prefix, data


def _check_byteorder(path: Path, archive: zipfile.ZipFile, prefix: str) -> None:
    # torch.save records the saving machine's sys.byteorder, but archives
    # from older torch versions have no record. NOTE: we read those as
    # little-endian. torch 2.13 assumes the loading machine's native order,
    # which gives the same result on x86 and ARM machines.
    try:
        info = archive.getinfo(prefix + BYTEORDER_NAME)
    except KeyError:
        return
    if info.file_size > 16:
        raise SourceError(f"{path}: {info.filename} is {info.file_size} bytes, but it should be 'little' or 'big'.")
    try:
        byteorder = archive.read(info).decode("ascii", errors="replace")
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as error:
        raise SourceError(f"{path}: cannot read {info.filename}: {error}.") from error
    if byteorder == "big":
        raise SourceError(
            f"{path}: the tensors were saved on a big-endian machine, and lowmem-moe reads only little-endian "
            "data. Convert the file to safetensors on that machine, which stores little-endian data."
        )
    if byteorder != "little":
        raise SourceError(f"{path}: {info.filename} contains {byteorder!r}, but it should be 'little' or 'big'.")


def _storage_member(
    path: Path, handle: BinaryIO, archive: zipfile.ZipFile, prefix: str, key: str, file_size: int
) -> _Member:
    name = prefix + STORAGE_FOLDER + key
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise SourceError(f"{path}: storage {name!r} that data.pkl refers to is missing from the zip file.") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise SourceError(
            f"{path}: storage {name!r} is compressed (zip method {info.compress_type}). lowmem-moe streams only "
            "uncompressed storages, which torch.save writes. Re-save the file with torch.save, or do not "
            "recompress the zip archive."
        )
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise SourceError(f"{path}: storage {name!r} is encrypted. Decrypt the checkpoint first.")

    data_start = _member_data_start(path, handle, info)
    if data_start + info.file_size > file_size:
        raise SourceError(
            f"{path}: storage {name!r} ends at byte {data_start + info.file_size}, past the end of the "
            f"{file_size}-byte file. The file is truncated."
        )
    return _Member(name=name, data_start=data_start, size=info.file_size)


def _member_data_start(path: Path, handle: BinaryIO, info: zipfile.ZipInfo) -> int:
    # The local header's extra field may differ in length from the central
    # directory's (torch pads it to align data to 64 bytes), so we read the
    # local header rather than trust the central directory.
    handle.seek(info.header_offset)
    raw = handle.read(_LOCAL_HEADER.size)
    if len(raw) < _LOCAL_HEADER.size:
        raise SourceError(f"{path}: the local header of {info.filename!r} lies past the end of the file.")
    signature, _, flags, method, _, _, _, _, _, name_length, extra_length = _LOCAL_HEADER.unpack(raw)
    if signature != _LOCAL_HEADER_SIGNATURE:
        raise SourceError(f"{path}: no zip local header at byte {info.header_offset} for {info.filename!r}.")
    if method != zipfile.ZIP_STORED:
        raise SourceError(
            f"{path}: the local header of {info.filename!r} gives zip method {method}, but the central "
            "directory says stored. The zip file is inconsistent."
        )
    raw_name = handle.read(name_length)
    local_name = raw_name.decode("utf-8" if flags & _UTF8_NAME_FLAG else "cp437", errors="replace")
    if local_name != info.orig_filename:
        raise SourceError(
            f"{path}: the local header at byte {info.header_offset} names {local_name!r}, but the central "
            f"directory names {info.filename!r}. The zip file is inconsistent."
        )
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _tensor_entry(path: Path, name: str, record: TensorRecord, member: _Member) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if record.dtype not in ITEM_SIZES:
        raise SourceError(f"{where} has an unknown dtype code {record.dtype!r}.")
    if record.lazy_flags:
        raise SourceError(
            f"{where} was saved with torch's lazy {' and '.join(record.lazy_flags)} bit set, so its bytes are "
            "not its values. Re-save it after calling .resolve_neg() and .resolve_conj() on the tensor."
        )
    if not _is_contiguous(record.shape, record.stride):
        raise SourceError(
            f"{where} is stored non-contiguously (shape {list(record.shape)}, stride {list(record.stride)}), "
            "so its bytes are not one range of the file. Re-save the state dict after calling .contiguous() "
            "on each tensor."
        )

    item_size = ITEM_SIZES[record.dtype]
    storage_bytes = record.storage.numel * ITEM_SIZES[record.storage.dtype]
    if storage_bytes != member.size:
        raise SourceError(
            f"{where}: its storage {member.name!r} is {member.size} bytes, but data.pkl declares "
            f"{record.storage.numel} elements of {record.storage.dtype}, which is {storage_bytes} bytes."
        )
    numel = 1
    for dim in record.shape:
        numel *= dim
    begin = record.storage_offset * item_size  # bytes from the start of the storage
    nbytes = numel * item_size
    if begin + nbytes > member.size:
        raise SourceError(
            f"{where} has bytes [{begin}, {begin + nbytes}), which lie outside its {member.size}-byte storage "
            f"{member.name!r}. The file is damaged."
        )
    return TensorEntry(
        name=name, dtype=record.dtype, shape=record.shape, offset=member.data_start + begin, nbytes=nbytes
    )


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # Row-major order, as torch's is_contiguous defines it: dimensions of size
    # one may have any stride, and a tensor with no elements is contiguous.
    if 0 in shape:
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _log_dropped_attributes(path: Path, records: dict[str, TensorRecord]) -> None:
    names = [name for name, record in records.items() if record.python_attributes]
    if names:
        attributes = sorted({attribute for name in names for attribute in records[name].python_attributes})
        logger.info(
            "%s: %d tensors carry extra Python attributes (%s), which lowmem-moe ignores. The first is %s.",
            path,
            len(names),
            ", ".join(attributes),
            names[0],
        )
