"""The order the benchmarks' realistic endpoint validates, shared by `apps.py`
(the served app) and `store.py`: Pydantic models only, so that importing them
builds no app and reads no environment."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Item(BaseModel):
    sku: str = Field(min_length=1, max_length=32)
    quantity: int = Field(gt=0, le=1000)
    unit_price: float = Field(ge=0)


class Order(BaseModel):
    customer_email: str = Field(max_length=254)
    items: list[Item] = Field(min_length=1, max_length=100)
    note: str | None = None
