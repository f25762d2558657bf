from extmind.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_TYPE_UNSPECIFIED: _ClassVar[InputType]
    INPUT_TYPE_DOCUMENT: _ClassVar[InputType]
    INPUT_TYPE_QUERY: _ClassVar[InputType]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_EMBEDDING: _ClassVar[ModelKind]
    MODEL_KIND_RERANKER: _ClassVar[ModelKind]
INPUT_TYPE_UNSPECIFIED: InputType
INPUT_TYPE_DOCUMENT: InputType
INPUT_TYPE_QUERY: InputType
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_EMBEDDING: ModelKind
MODEL_KIND_RERANKER: ModelKind

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "model", "input_type", "instruction", "dimensions", "normalize", "truncate", "token_inputs")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    input_type: InputType
    instruction: str
    dimensions: int
    normalize: bool
    truncate: bool
    token_inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., input_type: _Optional[_Union[InputType, str]] = ..., instruction: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., token_inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "dimensions", "token_counts")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _common_pb2.Tensor
    model: str
    dimensions: int
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[str] = ..., dimensions: _Optional[int] = ..., token_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("inputs", "model", "input_type", "instruction", "dimensions", "normalize", "truncate", "token_inputs")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    input_type: InputType
    instruction: str
    dimensions: int
    normalize: bool
    truncate: bool
    token_inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., input_type: _Optional[_Union[InputType, str]] = ..., instruction: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., token_inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("embeddings", "model", "dimensions", "token_counts", "sequence")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    embeddings: _common_pb2.Tensor
    model: str
    dimensions: int
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    sequence: int
    def __init__(self, embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., model: _Optional[str] = ..., dimensions: _Optional[int] = ..., token_counts: _Optional[_Iterable[int]] = ..., sequence: _Optional[int] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "instruction", "model", "top_n", "return_documents")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    model: str
    top_n: int
    return_documents: bool
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., model: _Optional[str] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "document")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    document: str
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., document: _Optional[str] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    model: str
    def __init__(self, results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("inputs", "model")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class TokenizeResult(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenizeResult]
    model: str
    def __init__(self, results: _Optional[_Iterable[_Union[TokenizeResult, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedderServiceGetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "aliases", "kind", "dimensions", "max_input_tokens", "dtype", "min_dimensions", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MIN_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    kind: ModelKind
    dimensions: int
    max_input_tokens: int
    dtype: _common_pb2.DType
    min_dimensions: int
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., dimensions: _Optional[int] = ..., max_input_tokens: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., min_dimensions: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class BatchingLimits(_message.Message):
    __slots__ = ("max_batch_tokens", "max_batch_size", "max_queue", "max_inputs_per_request", "max_response_bytes")
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_tokens: int
    max_batch_size: int
    max_queue: int
    max_inputs_per_request: int
    max_response_bytes: int
    def __init__(self, max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_inputs_per_request: _Optional[int] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class EmbedderServiceGetInfoResponse(_message.Message):
    __slots__ = ("models", "default_model", "batching", "available_models", "model_memory_budget_bytes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    batching: BatchingLimits
    available_models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    model_memory_budget_bytes: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., batching: _Optional[_Union[BatchingLimits, _Mapping]] = ..., available_models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., model_memory_budget_bytes: _Optional[int] = ...) -> None: ...
