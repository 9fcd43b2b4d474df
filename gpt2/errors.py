"""The one error type the gpt2 package raises for problems a user can fix.

The CLI turns it into a one-line message on stderr and exit code 2; library users can catch it.
The message always names the problem and, where there is one, the fix.
"""


class GPT2Error(Exception):
    """A problem with the user's input, files or environment (not a bug in this package)."""
