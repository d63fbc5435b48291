"""Builders the unit and integration tests share: photos, models, workspaces, fault injection."""
