"""The same routes with async views."""

from __future__ import annotations

from tests.django_project.urls import patterns

urlpatterns = patterns(asynchronous=True)
