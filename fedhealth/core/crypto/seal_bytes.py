"""Ciphertexts made with `tenseal.sealapi`, as the bytes `ts.ckks_vector_from` reads.

TenSEAL's Python API encrypts real vectors into full ciphertexts only. `tenseal.sealapi`
exposes SEAL itself (complex slots, seeded symmetric ciphertexts) but saves objects only to a
path: `SealSink` gives it an in-memory file, and `vector_bytes` wraps what SEAL wrote in
TenSEAL's own `CKKSVectorProto`, so the aggregator keeps parsing with TenSEAL. Holds no key.
"""

import os
import tempfile
from types import TracebackType
from typing import Protocol

from google.protobuf import (  # type: ignore[import-untyped]  # no stubs shipped with protobuf
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)


def _ckks_vector_proto() -> type:
    """CKKSVectorProto of tenseal/proto/tensors.proto, which TenSEAL compiles for C++ only."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="fedhealth/tenseal_tensors.proto", package="tenseal", syntax="proto3")
    message = file.message_type.add(name="CKKSVectorProto")
    message.field.add(name="sizes", number=1, type=field.TYPE_UINT32, label=field.LABEL_REPEATED)
    message.field.add(name="ciphertexts", number=2, type=field.TYPE_BYTES,
                      label=field.LABEL_REPEATED)
    message.field.add(name="scale", number=3, type=field.TYPE_DOUBLE, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tenseal.CKKSVectorProto"))


CKKSVectorProto = _ckks_vector_proto()


def vector_bytes(seal_ciphertext: bytes, slots: int, scale: float) -> bytes:
    """One SEAL ciphertext with `slots` used slots, serialized as a TenSEAL CKKSVector."""
    message = CKKSVectorProto(sizes=[slots], ciphertexts=[seal_ciphertext], scale=scale)
    return message.SerializeToString()


class Savable(Protocol):
    def save(self, path: str) -> None: ...


class SealSink:
    """A file `sealapi` objects save into; `dump` returns the bytes. Use as a context manager.

    Linux gets an anonymous in-memory file; elsewhere a temporary file (ciphertexts only).
    """

    def __enter__(self) -> "SealSink":
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create("fedhealth-ciphertext")
            self.path, self._temporary = f"/proc/self/fd/{self._fd}", False
        else:
            self._fd, self.path = tempfile.mkstemp(suffix=".seal")
            self._temporary = True
        return self

    def dump(self, obj: Savable) -> bytes:
        obj.save(self.path)  # SEAL truncates and rewrites the file
        return os.pread(self._fd, os.fstat(self._fd).st_size, 0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        os.close(self._fd)
        if self._temporary:
            os.unlink(self.path)
