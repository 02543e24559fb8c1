"""The one exception type the data package raises for anything a user can fix."""


class DataError(ValueError):
  """Bad data or a bad data argument; the message names the file or value and the fix."""
