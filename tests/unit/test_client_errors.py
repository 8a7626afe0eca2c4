"""Typed SDK errors decoded from gRPC statuses with AIP-193 details."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from kbmesh.client import KbmeshError, NotFound, ResourceExhausted, Unavailable
from kbmesh.client.errors import from_rpc_error


class FakeRpcError(grpc.RpcError):
    """What grpc raises for a failed call: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def packed(code: int, message: str, *details: Any) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_error_info_becomes_reason_domain_and_metadata() -> None:
    info = error_details_pb2.ErrorInfo(
        reason="KNOWLEDGE_BASE_NOT_FOUND", domain="knowledge.kbmesh", metadata={"id": "kb1"}
    )
    error = from_rpc_error(
        FakeRpcError(grpc.StatusCode.NOT_FOUND, "kb1 missing", packed(5, "kb1 missing", info))
    )
    assert isinstance(error, NotFound)
    assert (error.reason, error.domain, error.metadata) == (
        "KNOWLEDGE_BASE_NOT_FOUND",
        "knowledge.kbmesh",
        {"id": "kb1"},
    )
    assert str(error) == "NOT_FOUND KNOWLEDGE_BASE_NOT_FOUND: kb1 missing"


def test_retry_info_becomes_retry_after_seconds() -> None:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(1500)
    error = from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "busy",
            packed(
                8,
                "busy",
                error_details_pb2.ErrorInfo(reason="TOO_MANY_UPLOADS"),
                error_details_pb2.RetryInfo(retry_delay=delay),
            ),
        )
    )
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after == 1.5
    assert error.reason == "TOO_MANY_UPLOADS"


def test_a_status_without_details_still_has_its_type_and_message() -> None:
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(error, Unavailable)
    assert (error.reason, error.message, error.retry_after) == ("", "connection refused", None)


def test_unknown_codes_and_garbled_details_fall_back_to_the_root_class() -> None:
    error = from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.UNKNOWN, "odd", (("grpc-status-details-bin", b"\xff\x00garbage"),)
        )
    )
    assert type(error) is KbmeshError
    assert error.message == "odd"
