"""Service C's routes."""

from django.http import HttpRequest, JsonResponse
from django.urls import path


def price(request: HttpRequest, item_id: int) -> JsonResponse:
    # item 0 fails on purpose: the demo's failing request.
    return JsonResponse({"item": item_id, "price": round(100 / item_id, 2)})


urlpatterns = [path("price/<int:item_id>", price)]
