"""Realistic shop traffic, and encoders that turn it into record values of each format.

:class:`TrafficGenerator` is pure and seeded: the same seed gives the same events. Its shape follows Retail
Rocket's public e-commerce data set (2.76 M events of one shop over 4.5 months of 2015):

- the mix of :class:`Mix`: the data set's 2.5 % add-to-basket and 0.8 % purchases; of its 96.7 % views,
  3 points go to category views (2 %) and searches (1 %), which it does not record; 15 % of product views are
  group views;
- visitor activity heavily skewed: a session's length follows a zeta law (P(k) ∝ k^-2.5), so three sessions in
  four have one event, the mean is about two (the data set: 2.76 M events from 1.41 M visitors) and a few
  sessions run to thousands; visitors return, keeping their session id as a device does;
- product, category and search popularity Zipf-distributed (a few products take most views);
- sessions that hang together: products are re-viewed, baskets fill from what was viewed, and an order holds
  the basket; one order in four repeats a product on a second line (sometimes at a discount) to exercise the
  merge of line items.

Fields are in the Avro shape of the schemas (``occurredAt`` as epoch milliseconds, ``unitPrice`` as a
Decimal with two places), ready for :func:`build_encoder`. Producing them to Kafka is done elsewhere.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import random
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro import schemaless_writer

from consumer import events
from consumer.decode import SCHEMAS_DIR, ParsedSchema, ValueFormat, load_reader_schemas
from consumer.errors import ConfigError

# --- traffic ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mix:
    """The share of each event type (they sum to 1) and of product views that are group views."""

    product_viewed: float = 0.937
    category_viewed: float = 0.020
    search_performed: float = 0.010
    item_added_to_basket: float = 0.025
    order_placed: float = 0.008
    group_views: float = 0.15

    def cumulative(self) -> list[tuple[float, str]]:
        shares = (
            (self.product_viewed, events.PRODUCT_VIEWED),
            (self.category_viewed, events.CATEGORY_VIEWED),
            (self.search_performed, events.SEARCH_PERFORMED),
            (self.item_added_to_basket, events.ITEM_ADDED_TO_BASKET),
            (self.order_placed, events.ORDER_PLACED),
        )
        total = sum(share for share, _ in shares)
        if abs(total - 1) > 1e-9 or min(share for share, _ in shares) < 0:
            raise ValueError(f"event shares must be non-negative and sum to 1, not {total}")
        bounds = itertools.accumulate(share for share, _ in shares)
        return [(bound, name) for bound, (_, name) in zip(bounds, shares, strict=True)]


_STOCKS: Final = ("Moscow", "SaintPetersburg", "Kazan", "Novosibirsk", "Yekaterinburg")
_PHRASES: Final = (
    "pampers", "iphone case", "running shoes", "coffee machine", "lego", "winter jacket", "headphones",
    "vacuum cleaner", "office chair", "yoga mat", "kettle", "backpack", "smart watch", "dress", "sneakers",
    "phone charger", "desk lamp", "baby stroller", "tent", "bicycle", "blender", "perfume", "jeans",
    "gaming mouse", "notebook", "toaster", "sunglasses", "wallet", "umbrella", "board game",
)  # fmt: skip
_PRODUCT_BASE: Final = 100_000
_GROUP_BASE: Final = 900_000_000
_GROUP_SIZE: Final = 6  # variants (sizes, colours) per product group
_CATEGORY_BASE: Final = 1_000
_MAX_SESSION: Final = 5_000
_RECENT: Final = 20  # products a session remembers having viewed


class _Zipf:
    """Ranks 0..n-1 drawn with weight 1/(rank+1)^s: a cumulative table and a bisection per draw."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self._cumulative = list(itertools.accumulate((k + 1) ** -s for k in range(n)))
        self._rng = rng

    def draw(self) -> int:
        return bisect.bisect_right(self._cumulative, self._rng.random() * self._cumulative[-1])


@dataclass(slots=True)
class _Session:
    session_id: str
    shop: str
    stock: str | None
    remaining: int
    viewed: list[int] = field(default_factory=list)
    basket: list[int] = field(default_factory=list)


class TrafficGenerator:
    """Sessions of many visitors that view, search, browse categories, add to basket and sometimes order.

    ``now_ms`` is either a start time in epoch milliseconds, from which events advance by random gaps (fully
    reproducible), or a clock read for each event (live traffic). Each visitor (``sessionId``, 24 hex digits)
    belongs to one of ``shops`` and, three times in ten, to a stock. :meth:`events` continues where the last
    call stopped.
    """

    def __init__(
        self,
        *,
        seed: int,
        shops: Sequence[str],
        visitors: int = 100_000,
        products: int = 50_000,
        now_ms: Callable[[], int] | int,
        mix: Mix = Mix(),  # frozen, so one shared default is safe
        concurrent_sessions: int = 256,
    ) -> None:
        if not shops:
            raise ValueError("shops must name at least one shop")
        if visitors < 1 or products < 1 or concurrent_sessions < 1:
            raise ValueError("visitors, products and concurrent_sessions must be at least 1")
        self._seed = seed
        self._rng = random.Random(seed)
        self._shops = tuple(shops)
        self._visitors = visitors
        self._mix = mix.cumulative()
        self._group_views = mix.group_views
        self._clock = now_ms if callable(now_ms) else None
        self._now = 0 if callable(now_ms) else now_ms
        ids = list(range(products))
        self._rng.shuffle(ids)  # so the popular products are spread over the id range
        self._product_ids = [_PRODUCT_BASE + i for i in ids]
        self._products = _Zipf(products, 1.0, self._rng)
        self._categories = _Zipf(max(20, products // 250), 1.0, self._rng)
        self._phrases = _Zipf(len(_PHRASES), 1.0, self._rng)
        self._session_lengths = list(itertools.accumulate(k**-2.5 for k in range(1, _MAX_SESSION + 1)))
        self._prices: dict[int, Decimal] = {}
        self._orders = 0
        self._sessions = [self._new_session() for _ in range(min(concurrent_sessions, visitors))]
        self._emit: Mapping[str, Callable[[_Session, dict[str, Any]], None]] = {
            events.PRODUCT_VIEWED: self._product_viewed,
            events.CATEGORY_VIEWED: self._category_viewed,
            events.SEARCH_PERFORMED: self._search_performed,
            events.ITEM_ADDED_TO_BASKET: self._item_added,
            events.ORDER_PLACED: self._order_placed,
        }

    def events(self, n: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """The next ``n`` events as (record short name, fields in Avro shape)."""
        rng = self._rng
        for _ in range(n):
            slot = rng.randrange(len(self._sessions))
            session = self._sessions[slot]
            type_name = self._event_type(rng.random())
            fields = self._common(session)
            self._emit[type_name](session, fields)
            session.remaining -= 1
            if session.remaining == 0:
                self._sessions[slot] = self._new_session()
            yield type_name, fields

    # --- building blocks ---------------------------------------------------------------------------------

    def _event_type(self, draw: float) -> str:
        for bound, name in self._mix:
            if draw < bound:
                return name
        return self._mix[-1][1]  # draw within rounding of 1

    def _new_session(self) -> _Session:
        visitor = self._rng.randrange(self._visitors)
        # The visitor's identity comes from a hash, not the random stream, so it is the same on every return.
        digest = hashlib.blake2b(f"{self._seed}:{visitor}".encode(), digest_size=16).digest()
        stock = _STOCKS[digest[14] % len(_STOCKS)] if digest[13] < 77 else None  # 77/256: about 30 %
        length = (
            bisect.bisect_right(self._session_lengths, self._rng.random() * self._session_lengths[-1]) + 1
        )
        return _Session(digest[:12].hex(), self._shops[digest[12] % len(self._shops)], stock, length)

    def _common(self, session: _Session) -> dict[str, Any]:
        if self._clock is not None:
            self._now = self._clock()
        else:
            self._now += int(self._rng.expovariate(1 / 20))  # about 50 events a second
        return {
            events.EVENT_ID: str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            events.OCCURRED_AT: self._now,
            events.SESSION_ID: session.session_id,
            events.SHOP_ID: session.shop,
            events.STOCK_ID: session.stock,
        }

    def _product(self, session: _Session) -> int:
        """A product the session saw before (a third of the time, if any), else a popular one."""
        if session.viewed and self._rng.random() < 0.35:
            return self._rng.choice(session.viewed)
        return self._product_ids[self._products.draw()]

    def _price(self, product: int) -> Decimal:
        """A fixed price per product, log-uniform between 0.99 and 999.99."""
        price = self._prices.get(product)
        if price is None:
            cents = int(99 * 1010 ** random.Random(product * 7919 + self._seed).random())
            price = self._prices[product] = Decimal(cents).scaleb(-2)
        return price

    def _quantity(self) -> int:
        draw = self._rng.random()
        return 1 if draw < 0.75 else 2 if draw < 0.93 else 3

    # --- one method per event type: add the type's own fields ------------------------------------------

    def _product_viewed(self, session: _Session, fields: dict[str, Any]) -> None:
        product = self._product(session)
        session.viewed = [*session.viewed[-(_RECENT - 1) :], product]
        fields["productId"] = product
        grouped = self._rng.random() < self._group_views
        fields["groupId"] = _GROUP_BASE + (product - _PRODUCT_BASE) // _GROUP_SIZE if grouped else None

    def _category_viewed(self, session: _Session, fields: dict[str, Any]) -> None:
        fields["categoryId"] = _CATEGORY_BASE + self._categories.draw()

    def _search_performed(self, session: _Session, fields: dict[str, Any]) -> None:
        fields["phrase"] = _PHRASES[self._phrases.draw()]

    def _item_added(self, session: _Session, fields: dict[str, Any]) -> None:
        product = self._product(session)
        session.basket = [*session.basket[-9:], product]  # a basket of at most ten lines
        fields["productId"] = product
        fields["quantity"] = self._quantity()

    def _order_placed(self, session: _Session, fields: dict[str, Any]) -> None:
        products = session.basket or [self._product(session) for _ in range(self._rng.randint(1, 3))]
        lines: list[dict[str, Any]] = [
            {"productId": p, "quantity": self._quantity(), "unitPrice": self._price(p)} for p in products
        ]
        if self._rng.random() < 0.25:  # the same product on a second line, a fifth of the time at 10 % off
            product = self._rng.choice(products)
            price = self._price(product)
            if self._rng.random() < 0.2:
                price = (price * Decimal("0.9")).quantize(Decimal("0.01"))
            lines.append({"productId": product, "quantity": 1, "unitPrice": price})
        session.basket = []
        self._orders += 1
        fields["orderId"] = f"ORD{self._orders:09d}"
        fields["lines"] = lines


# --- encoders ---------------------------------------------------------------------------------------------


class Encoder(Protocol):
    def encode(self, type_name: str, fields: dict[str, Any]) -> bytes:
        """One record value for the event ``type_name`` (short or full name) with ``fields`` (Avro shape)."""
        ...


class _Schemas:
    """The project's schemas by short and full name, parsed and as text."""

    def __init__(self, directory: Path) -> None:
        self.parsed: dict[str, ParsedSchema] = {}
        self.text: dict[str, str] = {}
        for full_name, schema in load_reader_schemas(directory).items():
            self.parsed[full_name] = self.parsed[events.short_name(full_name)] = schema
        for path in sorted(directory.glob("*.avsc")):  # the text to register: the file, compacted
            raw = json.loads(path.read_text(encoding="utf-8"))
            name, namespace = raw["name"], raw.get("namespace")
            self.text[name if "." in name or not namespace else f"{namespace}.{name}"] = json.dumps(raw)

    def full_name(self, type_name: str) -> str:
        schema = self.parsed.get(type_name)
        if schema is None:
            raise ValueError(f"unknown record type {type_name!r}")
        return str(schema["name"])


class AvroEncoder:
    """``avro``: the bare Avro body, written with the project's schema of the event's type."""

    def __init__(self, schemas: _Schemas) -> None:
        self._schemas = schemas

    def encode(self, type_name: str, fields: dict[str, Any]) -> bytes:
        schema = self._schemas.parsed.get(type_name)
        if schema is None:
            raise ValueError(f"unknown record type {type_name!r}")
        buffer = io.BytesIO()
        schemaless_writer(buffer, schema, fields)
        return buffer.getvalue()


class ConfluentAvroEncoder:
    """``confluent-avro``: registers each type's schema once, then prefixes bodies with magic byte and id.

    Subjects follow the record name strategy (the subject is the record's full name), because one topic
    carries several event types; the topic name strategy would allow only one schema per topic.
    """

    def __init__(self, registry: SchemaRegistryClient, schemas: _Schemas) -> None:
        self._registry = registry
        self._schemas = schemas
        self._avro = AvroEncoder(schemas)
        self._headers: dict[str, bytes] = {}

    def schema_id(self, type_name: str) -> int:
        """The registry id of the project's schema of ``type_name``, registered on first use."""
        return int.from_bytes(self._header(type_name)[1:], "big")

    def encode(self, type_name: str, fields: dict[str, Any]) -> bytes:
        return self._header(type_name) + self._avro.encode(type_name, fields)

    def _header(self, type_name: str) -> bytes:
        header = self._headers.get(type_name)
        if header is None:
            full_name = self._schemas.full_name(type_name)
            schema_id = self._registry.register_schema(
                full_name, Schema(self._schemas.text[full_name], "AVRO")
            )
            header = self._headers[type_name] = b"\x00" + schema_id.to_bytes(4, "big")
        return header


class JsonEncoder:
    """``json``: the fields as one JSON object plus ``"eventType"``, the record's short name.

    Decimals become strings (exact), epoch milliseconds stay integers, datetimes become ISO 8601 text.
    """

    def __init__(self, schemas: _Schemas) -> None:
        self._schemas = schemas

    def encode(self, type_name: str, fields: dict[str, Any]) -> bytes:
        short = events.short_name(self._schemas.full_name(type_name))
        return orjson.dumps({events.JSON_TYPE_KEY: short, **fields}, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def build_encoder(
    fmt: ValueFormat, *, registry: SchemaRegistryClient | None = None, schemas_dir: Path | None = None
) -> Encoder:
    """An encoder of one value format; ``confluent-avro`` needs ``registry`` (it registers the schemas)."""
    schemas = _Schemas(schemas_dir or SCHEMAS_DIR)
    if fmt == "confluent-avro":
        if registry is None:
            raise ConfigError("registry", "the confluent-avro format needs a schema registry")
        return ConfluentAvroEncoder(registry, schemas)
    if fmt == "avro":
        return AvroEncoder(schemas)
    if fmt == "json":
        return JsonEncoder(schemas)
    raise ConfigError("format", f"unknown value format {fmt!r}")
