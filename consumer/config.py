"""The relay's configuration: one frozen, validated object built once at start-up and passed down.

No other module reads the environment. Secrets (``apiKey``) are ``SecretStr``: they print as ``**********``
and are revealed only where the request is built.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

DEFAULT_BASE_URL = "https://apptracking.retailrocket.net/1.0/"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShopConfig(_Frozen):
    """One Retail Rocket shop: the platform's shop id maps to a ``partnerId`` and its secret ``apiKey``."""

    partner_id: str = Field(min_length=1, description="Retail Rocket partnerId (public)")
    api_key: SecretStr = Field(description="Retail Rocket apiKey (secret; never logged)")
    rate_limit: float | None = Field(
        default=50.0, gt=0, description="requests per second for this shop; None turns the limiter off"
    )


class TrackingConfig(_Frozen):
    """How the relay talks to the tracking API."""

    base_url: str = DEFAULT_BASE_URL
    single_timeout: float = Field(default=0.5, gt=0, description="seconds, for one single-event call")
    batch_timeout: float = Field(default=10.0, gt=0, description="seconds, for one visitorEvents call")
    concurrency: int = Field(default=64, ge=1, description="connections in the keep-alive pool")
    verify_tls: bool = True
