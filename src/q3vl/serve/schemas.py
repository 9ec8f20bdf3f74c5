"""Request and response bodies, copied field for field from the APIs the official clients speak.

- OpenAI `POST /v1/embeddings` (openai-python `embeddings.create`), with vLLM's multimodal `messages`
  form (one embedding per request) and its `normalize` extension;
- Cohere v2 `POST /v2/embed` (cohere-python `ClientV2.embed`; vLLM implements it too);
- rerank (`/v1/rerank`, `/rerank`, `/v2/rerank`): the Cohere/Jina/vLLM shape, with vLLM's
  `{"content": [...]}` documents and query.

Unknown fields are refused (a typo must not be silently ignored). q3vl's own per-item options
(`ItemOptions`: instruction, fps, max_frames, min/max/total_pixels, video_budget) may be given on the request
(they apply to every item) or, where an item is an object, on the item. Numbers are strict (an
integer field takes only a JSON integer: `true`, `"5"` and `2.0` are refused; a float field takes
integers and floats, never booleans or strings), bounded and finite (JSON parsers accept NaN and
1e999); lists and strings have caps, so a request's size is limited before any work starts.

A rejected body costs little: every list stops at its first bad element (`fail_fast`), an object
with more keys than its model has fields is refused as a whole before its keys are looked at, and
the routes check item lists against --max-client-batch-size before validation. A 100,000-element
list of bad documents is one error, not 200,000.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from q3vl.preprocess import KEYS, OPTION_KEYS

MAX_TEXT = 4 * 1024 * 1024  # characters in one string; the body limit is usually lower
MAX_PARTS = 256  # content parts in one item
MAX_LIST = 100_000  # any list; the per-request item limit (--max-client-batch-size) is checked after
MAX_UNKNOWN_SHOWN = 5  # unknown keys an error names
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Name = Annotated[str, Field(max_length=256)]
Int = StrictInt  # a JSON integer: not true, "5" or 2.0
Float = StrictFloat  # a JSON number (2 is a fine fps): not true or "2"


class Strict(BaseModel):
    """A request body part: unknown fields are a 400 naming them (an object with more keys than the
    model has fields is refused before its keys are examined one by one).
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _few_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(cls.model_fields):
            unknown = []
            for key in data:
                if key not in cls.model_fields:
                    unknown.append(str(key)[:50])
                    if len(unknown) == MAX_UNKNOWN_SHOWN:
                        break
            raise ValueError(f"{len(data)} fields where at most {len(cls.model_fields)} are known; unknown: "
                             + ", ".join(unknown))
        return data


def _option_fields() -> dict[str, Any]:
    """One optional field per option key of the item model (`q3vl.preprocess.items.KEYS`)."""
    strict = {int: Int, float: Float, bool: StrictBool}  # numbers are strict here too: `true` is no fps
    return {k.name: (strict.get(k.kind, k.kind) | None, Field(None, description=k.help, **k.bounds))
            for k in KEYS if k.option}


if TYPE_CHECKING:  # the fields are made from the key table; a type checker sees the base
    _Options = Strict
else:
    _Options = create_model("_Options", __base__=Strict, **_option_fields())


class ItemOptions(_Options):
    """q3vl's per-item options (extensions to every API), honoured exactly as `process()` does: the
    option keys of the item model, one field each (a key added there is a field here).
    """

    def options(self) -> dict[str, Any]:
        """The options that were given, as runtime item keys."""
        return {k: v for k, v in self.model_dump(include=set(OPTION_KEYS)).items() if v is not None}


# ---------------------------------------------------------------- content parts (OpenAI / vLLM / Cohere)
class URL(Strict):
    """A media reference: a data: URI, an http(s) URL, or (with --media-root) a path."""

    url: Text
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's image_url.detail (accepted, not used)


class TextPart(Strict):
    """A text content part."""

    type: Literal["text"]
    text: Text


class ImagePart(Strict):
    """An image content part (OpenAI/Cohere `image_url`)."""

    type: Literal["image_url"]
    image_url: URL


class VideoPart(Strict):
    """A video content part (vLLM's `video_url`)."""

    type: Literal["video_url"]
    video_url: URL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
Parts = Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_PARTS, fail_fast=True)]


# ---------------------------------------------------------------- OpenAI / vLLM embeddings
class ChatMessage(Strict):
    """vLLM's chat message: a system message is the instruction, user messages the content."""

    role: Literal["system", "user"]
    content: Text | Parts


class EmbeddingRequest(ItemOptions):
    """OpenAI's embeddings request; `messages` is vLLM's multimodal form (all of it is one input)."""

    model: Name | None = None
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_LIST, fail_fast=True)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_PARTS, fail_fast=True)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = Field(None, ge=1, le=1 << 16)
    user: Name | None = None
    normalize: StrictBool = Field(True, description="vLLM extension: False returns the raw pooled state.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        """OpenAI's API also takes token ids; q3vl refuses them with what to do instead (see TOKEN_IDS)."""
        if _token_ids(value):
            raise PydanticCustomError("token_ids_not_supported", TOKEN_IDS)
        return value


TOKEN_IDS = (
    "token-id input is not supported: q3vl tokenizes text with the model's own tokenizer, and ids made by another "
    "tokenizer (such as the tiktoken ids LangChain's OpenAIEmbeddings sends by default) would give wrong vectors. "
    "Send the text as strings: LangChain OpenAIEmbeddings(..., check_embedding_ctx_length=False); LlamaIndex "
    "OpenAILikeEmbedding(model_name=..., api_base=<this server>/v1), which sends strings; or use q3vl's own "
    "integrations (q3vl.integrations.langchain, q3vl.integrations.llama_index), which also embed images and videos")


def _token_ids(value: Any) -> bool:
    """Whether an `input` is OpenAI's token-id form: ints, or lists of ints (the first element decides)."""
    first = value[0] if isinstance(value, list) and value else value
    if isinstance(first, list) and first:
        first = first[0]
    return isinstance(first, int) and not isinstance(first, bool)


class EmbeddingData(BaseModel):
    """One embedding: a float list, or base64 of little-endian float32 bytes."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Tokens of the request, text and vision."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """OpenAI's embeddings response."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------- Cohere v2 embed
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereInput(ItemOptions):
    """One mixed input of `inputs`: its content parts (text, image_url; q3vl adds video_url) are one item."""

    content: Parts


class EmbedV2Request(ItemOptions):
    """Cohere's v2 embed request: exactly one of `texts`, `images` (data URIs) or `inputs`."""

    model: Name | None = None
    input_type: Name | None = None
    texts: Annotated[list[Text], Field(max_length=MAX_LIST, fail_fast=True)] | None = None
    images: Annotated[list[Text], Field(max_length=MAX_LIST, fail_fast=True)] | None = None
    inputs: Annotated[list[CohereInput], Field(max_length=MAX_LIST, fail_fast=True)] | None = None
    max_tokens: Int | None = Field(None, ge=1, le=1 << 20)
    output_dimension: Int | None = Field(None, ge=1, le=1 << 16)
    embedding_types: Annotated[list[EmbeddingType], Field(min_length=1, max_length=6, fail_fast=True)] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    priority: Int | None = Field(None, ge=0, le=1 << 16)


class EmbedByType(BaseModel):
    """One array per requested type, each as long as the inputs."""

    float: list[list[builtins.float]] | None = None
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class ApiVersion(BaseModel):
    """Cohere's API version marker."""

    version: str = "2"


class Units(BaseModel):
    """Cohere's billed units."""

    input_tokens: int | None = None
    images: int | None = None
    search_units: int | None = None


class Tokens(BaseModel):
    """Cohere's token counts."""

    input_tokens: int | None = None


class Meta(BaseModel):
    """Cohere's response metadata."""

    api_version: ApiVersion = Field(default_factory=ApiVersion)
    billed_units: Units | None = None
    tokens: Tokens | None = None


class EmbedV2Response(BaseModel):
    """Cohere's v2 embed response (`embeddings_by_type`)."""

    id: str
    embeddings: EmbedByType
    texts: list[str] | None = None
    meta: Meta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


# ---------------------------------------------------------------- rerank (Cohere / Jina / vLLM)
class MultiModal(Strict):
    """vLLM's multimodal query or document: its content parts are one query / one document."""

    content: Parts


class RerankRequest(ItemOptions):
    """Rerank request (Cohere/Jina/vLLM): a query, documents, `top_n`, `return_documents`."""

    model: Name | None = None
    query: Text | MultiModal
    documents: Annotated[list[Text | MultiModal], Field(max_length=MAX_LIST, fail_fast=True)]
    top_n: Int | None = Field(None, ge=0, le=1 << 31, description="0 or absent: every document.")
    return_documents: StrictBool = True
    max_tokens_per_doc: Int | None = Field(None, ge=1, le=1 << 20)
    priority: Int | None = Field(None, ge=0, le=1 << 16)


class RerankDocument(BaseModel):
    """The document echoed in a rerank result: text, or vLLM's multimodal parts."""

    text: str | None = None
    multi_modal: list[dict[str, Any]] | None = None


class RerankResult(BaseModel):
    """One document's score and its index in the request."""

    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    """Tokens of every (query, document) pair."""

    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    """Rerank response: results sorted by `relevance_score`, cut to `top_n`."""

    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
    meta: Meta


# ---------------------------------------------------------------- the rest
class ModelCard(BaseModel):
    """One served model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "q3vl"
    task: str


class ModelList(BaseModel):
    """The served models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """What went wrong; `param` names the request field."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used for every 4xx and 5xx."""

    error: ErrorBody


class Status(BaseModel):
    """A probe's answer."""

    status: str
