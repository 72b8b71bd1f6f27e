"""The automatic compression-recipe search: space, scoring, front and the persisted studies (issue 15)."""
