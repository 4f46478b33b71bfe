"""The domain events this relay understands: their names and the fields every one of them carries.

The Avro schemas in ``consumer/schemas/`` (package data) are the source of truth; this module only names
them, so decoding, translation and the traffic generator spell each name once. All records share the
namespace :data:`NAMESPACE`; a record's full name is ``NAMESPACE + "." + short name``, and everything past
decoding speaks of an event by its short name (``"ProductViewed"``).
"""

from __future__ import annotations

from typing import Final

#: The Avro namespace of every event record (and of nested records such as ``OrderLine``).
NAMESPACE: Final = "com.shopplatform.events"

PRODUCT_VIEWED: Final = "ProductViewed"
CATEGORY_VIEWED: Final = "CategoryViewed"
SEARCH_PERFORMED: Final = "SearchPerformed"
ITEM_ADDED_TO_BASKET: Final = "ItemAddedToBasket"
ORDER_PLACED: Final = "OrderPlaced"

#: Short names of the event records, one ``.avsc`` file each.
EVENT_TYPES: Final[tuple[str, ...]] = (
    PRODUCT_VIEWED,
    CATEGORY_VIEWED,
    SEARCH_PERFORMED,
    ITEM_ADDED_TO_BASKET,
    ORDER_PLACED,
)

# Fields common to every event record.
EVENT_ID: Final = "eventId"
OCCURRED_AT: Final = "occurredAt"  # timestamp-millis; decoded as epoch milliseconds (int, UTC)
SESSION_ID: Final = "sessionId"  # the visitor: the record key and Retail Rocket's sessionExternalId
SHOP_ID: Final = "shopId"  # selects the Retail Rocket partnerId/apiKey through configuration
STOCK_ID: Final = "stockId"  # optional stock/region

#: With the ``json`` value format, the key of the object that names its record type (short or full name).
JSON_TYPE_KEY: Final = "eventType"


def full_name(type_name: str) -> str:
    """The Avro full name of an event given by its short name; a name with a dot is returned as it is."""
    return type_name if "." in type_name else f"{NAMESPACE}.{type_name}"


def short_name(name: str) -> str:
    """The short name of an Avro full name: the part after the last dot."""
    return name.rpartition(".")[2]
