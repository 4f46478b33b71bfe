"""Translate: one :class:`~consumer.decode.DomainEvent` → the tracking calls it implies.

=====================  =====================================================================================
event                  calls
=====================  =====================================================================================
ProductViewed          ``view``, or ``groupView`` when the event names the product group (``groupId``)
CategoryViewed         ``categoryView``
SearchPerformed        ``search`` (``searchPhrase`` = the event's ``phrase``)
ItemAddedToBasket      ``addToBasket`` (Retail Rocket takes no quantity here)
OrderPlaced            one ``order`` per distinct product, in order of first appearance; see below
=====================  =====================================================================================

Every call carries ``sessionExternalId`` (the event's ``sessionId``), ``timestamp`` (the event's
``occurredAt`` as ISO 8601 in UTC with milliseconds, ``2018-09-15T15:53:00.000+00:00``, so a replay keeps the
original time) and ``stockId`` when the event has one (the order's stock applies to all its items).

Orders: line items of one product are merged, as Retail Rocket's own tracker does: quantities are summed, and
``price`` is the unit price after discounts as a JSON number; when the lines of one product carry different
unit prices, ``price`` is their quantity-weighted mean, so ``quantity * price`` still equals what was paid.
``transaction`` is the order id.

Every call is checked against the contract (the rules the emulator enforces) before it leaves here; a call
that breaks them, an event of an unconfigured shop, or an event that lacks a field raises
:class:`~consumer.errors.TranslateError` (permanent: the record is dead-lettered without an HTTP call). The
common event types check their few fields inline as they build the body (:func:`_session_ok` and friends:
the same rules, in a fraction of the time of :func:`consumer.contract.validate_call`); only a call that
fails an inline check, or one of a type without them (orders), goes through ``validate_call``, which then
names the field and the reason. The inline checks may refuse more than the contract (that costs only the
slow path), never less: ``tests/test_translate.py`` holds them to that.
Reasons name the field and quote the event's own values, never a credential: the translator only ever sees
shop keys.

Pure and cheap: no I/O, no clock, no per-record validation model; plain dicts in, plain dicts out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from consumer import events
from consumer.config import ShopConfig
from consumer.contract import MAX_ID, MAX_STRING, Method, TrackingCall, Violation, validate_call
from consumer.decode import DomainEvent
from consumer.errors import ConfigError, TranslateError

Body = dict[str, Any]
#: A handler returns the calls and whether its inline checks passed them all (see the module docstring).
_Built = tuple[list[TrackingCall], bool]
_Handler = Callable[[dict[str, Any], str], _Built]

#: Where each body field comes from in the event, to point a dead-letter reader at the right value.
_SOURCE: Final[Mapping[str, str]] = {
    "sessionExternalId": events.SESSION_ID,
    "timestamp": events.OCCURRED_AT,
    "stockId": events.STOCK_ID,
    "productId": "productId",
    "groupId": "groupId",
    "categoryId": "categoryId",
    "searchPhrase": "phrase",
    "transaction": "orderId",
    "quantity": "lines[].quantity",
    "price": "lines[].unitPrice",
}


class Translator:
    """Turns decoded events into tracking calls for the configured shops.

    ``shops`` maps the platform's shop id (the event's ``shopId``) to its Retail Rocket settings; a call's
    ``shop`` is that key. An event of a shop not in ``shops`` goes to ``default_shop`` when one is set, and
    is a :class:`~consumer.errors.TranslateError` otherwise.
    """

    def __init__(self, shops: Mapping[str, ShopConfig], default_shop: str | None = None) -> None:
        if default_shop is not None and default_shop not in shops:
            raise ConfigError("default_shop", f"{default_shop!r} is not one of the configured shops")
        self._shops = frozenset(shops)  # only the keys: credentials never come near a call or a reason
        self._default_shop = default_shop
        self._handlers: Mapping[str, _Handler] = {
            events.PRODUCT_VIEWED: self._product_viewed,
            events.CATEGORY_VIEWED: self._category_viewed,
            events.SEARCH_PERFORMED: self._search_performed,
            events.ITEM_ADDED_TO_BASKET: self._item_added_to_basket,
            events.ORDER_PLACED: self._order_placed,
        }

    def translate(self, event: DomainEvent) -> list[TrackingCall]:
        """The calls ``event`` implies, each valid under the contract; raises TranslateError otherwise."""
        calls, checked = self._build(event)
        if not checked:
            for call in calls:
                violation = validate_call(call)
                if violation is not None:
                    raise _violation_error(call, violation)
        return calls

    def translate_partial(self, event: DomainEvent) -> tuple[list[TrackingCall], list[tuple[int, str]]]:
        """Like :meth:`translate`, but an event whose calls are only partly valid is not refused whole.

        Returns all the calls and the ``(index, reason)`` of those that break the contract: an order with one
        bad line item still delivers its good items, and only the bad one is dead-lettered. When no call is
        valid, this raises TranslateError as :meth:`translate` does.
        """
        calls, checked = self._build(event)
        if checked:
            return calls, []
        rejected: list[tuple[int, str]] = []
        first: TranslateError | None = None
        for index, call in enumerate(calls):
            violation = validate_call(call)
            if violation is not None:
                error = _violation_error(call, violation)
                first = first or error
                rejected.append((index, error.reason))
        if first is not None and len(rejected) == len(calls):
            raise first
        return calls, rejected

    def _build(self, event: DomainEvent) -> _Built:
        handler = self._handlers.get(event.type)
        if handler is None:
            raise TranslateError(f"no translation for event type {event.type!r}", field="type")
        fields = event.fields
        try:
            shop = fields[events.SHOP_ID]
            built = handler(fields, shop if shop in self._shops else self._shop_of(fields))
        # Only hand-built events get here: decoded ones carry every field, each of its schema's type.
        except KeyError as exc:
            name = str(exc.args[0])
            raise TranslateError(f"{event.type} event lacks the field {name!r}", field=name) from None
        except TypeError as exc:
            raise TranslateError(f"{event.type} event has a field of the wrong type: {exc}") from None
        return built

    def _shop_of(self, fields: dict[str, Any]) -> str:
        shop = fields[events.SHOP_ID]
        if shop in self._shops:
            return str(shop)
        if self._default_shop is not None:
            return self._default_shop
        raise TranslateError(f"shop {shop!r} is not configured and there is no default shop", field="shopId")

    # --- one method per event type; each returns the calls and whether its inline checks passed them ---
    # Bodies are dict literals built in place: this runs once per record, and merging a common part into
    # each body cost more than the rest of the translation.

    def _product_viewed(self, fields: dict[str, Any], shop: str) -> _Built:
        # Nine events in ten: the time and stock helpers are inlined here.
        session, product, at = fields[events.SESSION_ID], fields["productId"], fields[events.OCCURRED_AT]
        group, stock = fields.get("groupId"), fields.get(events.STOCK_ID)
        checked = type(at) is int and _session_ok(session) and _id_ok(product) and _stock_ok(stock)
        if group is None:
            body: Body = {"sessionExternalId": session, "productId": product, "timestamp": _timestamp(at)}
            method: Method = "view"
        else:
            body = {
                "sessionExternalId": session,
                "groupId": group,
                "productId": product,
                "timestamp": _timestamp(at),
            }
            method, checked = "groupView", checked and _id_ok(group)
        if stock is not None:
            body["stockId"] = stock
        return [TrackingCall(shop, method, body)], checked

    def _category_viewed(self, fields: dict[str, Any], shop: str) -> _Built:
        session, category, at = fields[events.SESSION_ID], fields["categoryId"], fields[events.OCCURRED_AT]
        body: Body = {  # categoryView and search take no stockId
            "sessionExternalId": session,
            "categoryId": category,
            "timestamp": _timestamp(at),
        }
        checked = _session_ok(session) and _id_ok(category) and type(at) is int
        return [TrackingCall(shop, "categoryView", body)], checked

    def _search_performed(self, fields: dict[str, Any], shop: str) -> _Built:
        session, phrase, at = fields[events.SESSION_ID], fields["phrase"], fields[events.OCCURRED_AT]
        body: Body = {"sessionExternalId": session, "searchPhrase": phrase, "timestamp": _timestamp(at)}
        checked = _session_ok(session) and _phrase_ok(phrase) and type(at) is int
        return [TrackingCall(shop, "search", body)], checked

    def _item_added_to_basket(self, fields: dict[str, Any], shop: str) -> _Built:
        session, product = fields[events.SESSION_ID], fields["productId"]
        body: Body = {"sessionExternalId": session, "productId": product}
        checked = _session_ok(session) and _id_ok(product) and _time_and_stock_ok(fields)
        return [TrackingCall(shop, "addToBasket", _with_time_and_stock(body, fields))], checked

    def _order_placed(self, fields: dict[str, Any], shop: str) -> _Built:
        order, lines = fields["orderId"], fields["lines"]
        if not lines:
            raise TranslateError(f"order {order!r} has no line items", field="lines")
        session = fields[events.SESSION_ID]
        return [
            TrackingCall(
                shop,
                "order",
                _with_time_and_stock(
                    {
                        "sessionExternalId": session,
                        "productId": product,
                        "quantity": quantity,
                        "price": price,
                        "transaction": order,
                    },
                    fields,
                ),
            )
            for product, quantity, price in _merge_lines(lines)
        ], False  # under 1 % of events, several fields each: validate_call checks them


# --- inline checks: True only when validate_call would pass the value (see the module docstring) ------


def _session_ok(value: Any) -> bool:
    """``sessionExternalId``: 1 to 50 ASCII letters and digits."""
    return type(value) is str and 0 < len(value) <= MAX_STRING and value.isascii() and value.isalnum()


def _id_ok(value: Any) -> bool:
    """A product, group or category id: an integer (not a bool) from 0 to 2^53 - 1."""
    return type(value) is int and 0 <= value <= MAX_ID


def _phrase_ok(value: Any) -> bool:
    """``searchPhrase``: a string that is not empty once trimmed."""
    return type(value) is str and value != "" and not value.isspace()


def _stock_ok(stock: Any) -> bool:
    """``stockId``: absent, or a string of at most 50 characters."""
    return stock is None or (type(stock) is str and len(stock) <= MAX_STRING)


def _time_and_stock_ok(fields: dict[str, Any]) -> bool:
    """``timestamp`` formatted from epoch milliseconds (always valid text), ``stockId`` absent or short."""
    return type(fields[events.OCCURRED_AT]) is int and _stock_ok(fields.get(events.STOCK_ID))


def _violation_error(call: TrackingCall, violation: Violation) -> TranslateError:
    source = _SOURCE.get(violation.field, violation.field)
    return TranslateError(
        f"{_describe(call)} breaks the contract: {violation.field} (from event field {source}) "
        f"{violation.reason}",
        field=violation.field,
    )


def _with_time_and_stock(body: Body, fields: dict[str, Any]) -> Body:
    """Add ``timestamp`` and, when the event has one, ``stockId`` to a body."""
    body["timestamp"] = _timestamp(fields[events.OCCURRED_AT])
    stock = fields.get(events.STOCK_ID)
    if stock is not None:
        body["stockId"] = stock
    return body


def _merge_lines(lines: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
    """(productId, total quantity, unit price) per distinct product, in order of first appearance."""
    merged: dict[Any, list[Any]] = {}  # productId → [quantity, amount paid, first unit price, one price?]
    for line in lines:
        product, quantity, price = line["productId"], line["quantity"], line["unitPrice"]
        entry = merged.get(product)
        if entry is None:
            merged[product] = [quantity, quantity * price, price, True]
        else:
            entry[0] += quantity
            entry[1] += quantity * price
            entry[3] = entry[3] and price == entry[2]
    return [
        (product, quantity, _number(price if same or quantity <= 0 else amount / quantity))
        for product, (quantity, amount, price, same) in merged.items()
    ]


def _number(price: Any) -> Any:
    """A price as a JSON number; anything that is not a number is left for validation to name."""
    return float(price) if type(price) is Decimal else price


def _describe(call: TrackingCall) -> str:
    if call.method == "order":
        return f"order call for product {call.body.get('productId')!r}"
    return f"{call.method} call"


# --- timestamps -------------------------------------------------------------------------------------------


def _timestamp(value: Any) -> Any:
    """``occurredAt`` as ISO 8601 in UTC with milliseconds.

    Decoders give epoch milliseconds; an aware ``datetime`` (a hand-built event) is accepted too. Anything
    else is passed on for validation to reject with the field's name.
    """
    if type(value) is int:
        seconds = value // 1000
        prefix = _SECONDS.get(seconds) or _utc_second(seconds)
        if prefix is None:
            raise TranslateError(
                f"timestamp (from event field {events.OCCURRED_AT}) {value} ms is outside years 1 to 9999",
                field="timestamp",
            )
        return prefix + _MILLIS[value - seconds * 1000]
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.isoformat(timespec="milliseconds")
    return value


#: ``.mmm+00:00`` for every millisecond: an index is cheaper than formatting a number.
_MILLIS: Final = tuple(f".{millis:03d}+00:00" for millis in range(1000))
#: ``YYYY-MM-DDTHH:MM:SS`` of recent epoch seconds. Events arrive in roughly time order, so consecutive
#: records share their second; a hit costs a tenth of formatting a datetime. Cleared when full.
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT: Final = 4096


def _utc_second(seconds: int) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS`` of an epoch second (and remember it), or None outside datetime's range."""
    try:
        text = datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None).isoformat()
    except (OverflowError, ValueError, OSError):  # what fromtimestamp raises for an out-of-range second
        return None
    if len(_SECONDS) >= _SECONDS_KEPT:
        _SECONDS.clear()  # threads racing here only cost a recomputation: dict operations are atomic
    _SECONDS[seconds] = text
    return text
