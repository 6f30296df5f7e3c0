"""Type stubs for the compiled engine ``robustpatch._core``.

Float arrays may be float32, float16, or uint16 holding bfloat16 bits (numpy has
no bfloat16). Arrays must be C-contiguous. Every kernel releases the GIL.
A quantized delta is a :class:`QuantTensor`, validated once when built.
Errors: InvalidArgumentError (a value out of range), MismatchError (inputs that do not
fit), NonFiniteError, FormatError, TypeError (a wrong array dtype) and the OSError
subclass of an I/O failure (FileNotFoundError, ...).
"""

import numpy as np
import numpy.typing as npt

__version__: str

class FormatError(ValueError): ...
class NonFiniteError(ValueError): ...

FloatArray = npt.NDArray[np.float32 | np.float16 | np.uint16]

class QuantTensor:
    """Packed codes and one scale/offset per group, validated when built; frozen, and its
    arrays are read-only views of its own memory (copied when built, or, where the arrays
    given view an immutable buffer such as a read-only map of a file, those arrays)."""

    def __init__(
        self,
        codes: npt.NDArray[np.uint8],
        scale: npt.NDArray[np.float32],
        offset: npt.NDArray[np.float32],
        bits: int,
        scheme: str,
        group_len: int,
        numel: int,
    ) -> None: ...
    @property
    def codes(self) -> npt.NDArray[np.uint8]: ...
    @property
    def scale(self) -> npt.NDArray[np.float32]: ...
    @property
    def offset(self) -> npt.NDArray[np.float32]: ...
    @property
    def bits(self) -> int: ...
    @property
    def scheme(self) -> str: ...
    @property
    def group_len(self) -> int: ...
    @property
    def numel(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def is_view(self) -> bool: ...

DeltaLike = FloatArray | QuantTensor

class Blake3:
    """Incremental BLAKE3 (parallel over large inputs, GIL released), like hashlib's."""

    def __init__(self) -> None: ...
    def update(self, data: bytes | npt.NDArray[np.uint8]) -> None: ...
    def update_widened(self, data: npt.NDArray[np.uint8], label: str) -> bool: ...
    def update_finite(self, data: npt.NDArray[np.uint8], label: str) -> bool: ...
    def hexdigest(self) -> str: ...

def quantize(x: FloatArray, bits: int, scheme: str, group_len: int) -> QuantTensor: ...
def dequantize(
    q: QuantTensor, start: int | None = None, stop: int | None = None
) -> npt.NDArray[np.float32]:
    """Elements ``start:stop``; the range starts on a group and byte boundary and ends on a
    group boundary or at the end."""

def pack(codes: npt.NDArray[np.uint8], bits: int) -> npt.NDArray[np.uint8]: ...
def unpack(packed: npt.NDArray[np.uint8], bits: int, n: int) -> npt.NDArray[np.uint8]: ...
def project(
    pretrained: FloatArray,
    clean: FloatArray,
    robust: FloatArray,
    out: npt.NDArray[np.float32] | None = None,
    hash_pretrained: bool = False,
) -> tuple[npt.NDArray[np.float32], dict[str, float | str]]: ...
def compact(
    values: npt.NDArray[np.float32],
) -> tuple[str, npt.NDArray[np.uint16] | None]: ...
def crc32(data: bytes | npt.NDArray[np.uint8]) -> int: ...
def tensor_digest(data: npt.NDArray[np.uint8], itemsize: int) -> str: ...
def apply(
    target: FloatArray,
    deltas: list[DeltaLike],
    alphas: list[float],
    record: bool = True,
) -> tuple[tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32 | np.uint16]] | None, int]: ...
def remove(
    target: FloatArray,
    deltas: list[DeltaLike],
    alphas: list[float],
    positions: npt.NDArray[np.uint32] | None = None,
    values: npt.NDArray[np.uint32 | np.uint16] | None = None,
) -> tuple[int, int]: ...
def dot(a: DeltaLike, b: DeltaLike) -> float: ...
def cosine(a: DeltaLike, b: DeltaLike) -> float: ...

HeaderEntry = tuple[str, str, list[int], int, int]
U64 = npt.NDArray[np.uint64]
# names, dtype codes (indices into the dtype names), shape ends, dims, offsets (begin, end)
HeaderColumns = tuple[list[str], npt.NDArray[np.uint8], tuple[str, ...], U64, U64, U64]

def read_header(path: str) -> tuple[dict[str, str], HeaderColumns, int]: ...
def parse_header(buf: bytes, file_len: int) -> tuple[dict[str, str], HeaderColumns, int]: ...
def encode_header(metadata: list[tuple[str, str]], tensors: list[HeaderEntry]) -> bytes: ...
