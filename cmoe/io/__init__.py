"""Files in and out: model loading, atomic artifacts, the profile format, carved directories, recipe files."""
