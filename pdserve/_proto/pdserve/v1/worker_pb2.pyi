from pdserve._proto.pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Plan(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_UNSPECIFIED: _ClassVar[Plan]
    PLAN_LOCAL: _ClassVar[Plan]
    PLAN_REMOTE: _ClassVar[Plan]
PLAN_UNSPECIFIED: Plan
PLAN_LOCAL: Plan
PLAN_REMOTE: Plan

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "plan", "prefill_address", "encoding", "fallback_prefill_addresses")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_PREFILL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    plan: Plan
    prefill_address: str
    encoding: _common_pb2.KVEncoding
    fallback_prefill_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., plan: _Optional[_Union[Plan, str]] = ..., prefill_address: _Optional[str] = ..., encoding: _Optional[_Union[_common_pb2.KVEncoding, str]] = ..., fallback_prefill_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "logprobs", "stop_reason", "prefill_compute_s", "kv_transfer_s", "kv_bytes", "num_cached_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    stop_reason: str
    prefill_compute_s: float
    kv_transfer_s: float
    kv_bytes: int
    num_cached_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., stop_reason: _Optional[str] = ..., prefill_compute_s: _Optional[float] = ..., kv_transfer_s: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "encoding", "num_cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    encoding: _common_pb2.KVEncoding
    num_cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., encoding: _Optional[_Union[_common_pb2.KVEncoding, str]] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("header", "chunk", "first_token")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    chunk: KVChunk
    first_token: FirstToken
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("protocol_version", "model_name", "num_layers", "num_kv_heads", "head_dim", "block_size", "encoding", "num_tokens", "num_cached_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    encoding: _common_pb2.KVEncoding
    num_tokens: int
    num_cached_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., model_name: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., encoding: _Optional[_Union[_common_pb2.KVEncoding, str]] = ..., num_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("seq", "layer", "token_offset", "num_tokens", "encoding", "k", "v", "k_scales", "v_scales", "crc32c")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    K_SCALES_FIELD_NUMBER: _ClassVar[int]
    V_SCALES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    seq: int
    layer: int
    token_offset: int
    num_tokens: int
    encoding: _common_pb2.KVEncoding
    k: bytes
    v: bytes
    k_scales: bytes
    v_scales: bytes
    crc32c: int
    def __init__(self, seq: _Optional[int] = ..., layer: _Optional[int] = ..., token_offset: _Optional[int] = ..., num_tokens: _Optional[int] = ..., encoding: _Optional[_Union[_common_pb2.KVEncoding, str]] = ..., k: _Optional[bytes] = ..., v: _Optional[bytes] = ..., k_scales: _Optional[bytes] = ..., v_scales: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token", "prefill_compute_s", "num_prompt_tokens", "num_cached_tokens")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token: _common_pb2.TokenLogprob
    prefill_compute_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    def __init__(self, token: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., prefill_compute_s: _Optional[float] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class WorkerStateRequest(_message.Message):
    __slots__ = ("prefix_summary",)
    PREFIX_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    prefix_summary: bool
    def __init__(self, prefix_summary: _Optional[bool] = ...) -> None: ...

class WorkerStateReply(_message.Message):
    __slots__ = ("role", "num_running", "num_waiting", "pending_prefill_tokens", "num_free_blocks", "num_blocks", "block_size", "prefill_tokens_per_s", "decode_step_s", "kv_link_bytes_per_s", "prefix_salt", "cached_blocks", "state_seq", "decode_step_budget_s", "kv_bytes_per_token", "kv_bytes_per_token_by_encoding", "kv_pending_bytes")
    class KvBytesPerTokenByEncodingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_S_FIELD_NUMBER: _ClassVar[int]
    KV_LINK_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SALT_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STATE_SEQ_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_BY_ENCODING_FIELD_NUMBER: _ClassVar[int]
    KV_PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    role: str
    num_running: int
    num_waiting: int
    pending_prefill_tokens: int
    num_free_blocks: int
    num_blocks: int
    block_size: int
    prefill_tokens_per_s: float
    decode_step_s: float
    kv_link_bytes_per_s: float
    prefix_salt: bytes
    cached_blocks: _containers.RepeatedScalarFieldContainer[int]
    state_seq: int
    decode_step_budget_s: float
    kv_bytes_per_token: float
    kv_bytes_per_token_by_encoding: _containers.ScalarMap[int, float]
    kv_pending_bytes: int
    def __init__(self, role: _Optional[str] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., pending_prefill_tokens: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., decode_step_s: _Optional[float] = ..., kv_link_bytes_per_s: _Optional[float] = ..., prefix_salt: _Optional[bytes] = ..., cached_blocks: _Optional[_Iterable[int]] = ..., state_seq: _Optional[int] = ..., decode_step_budget_s: _Optional[float] = ..., kv_bytes_per_token: _Optional[float] = ..., kv_bytes_per_token_by_encoding: _Optional[_Mapping[int, float]] = ..., kv_pending_bytes: _Optional[int] = ...) -> None: ...
