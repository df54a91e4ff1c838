"""The `nos` command line: thin click commands over the nos library."""
