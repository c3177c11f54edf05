"""Reading config values that the command line sets as strings."""


def names(value: str | tuple[str, ...] | None) -> list[str]:
  """A comma-separated string or tuple of strings as a list of names.

  `--config.key=a,b` sets a tuple field to ('a,b',), so items are split too.
  """
  if not value:
    return []
  if isinstance(value, str):
    value = (value,)
  split = (name.strip() for item in value for name in item.split(','))
  return [name for name in split if name]
