"""Markdown chapters to documents and labels; the token cache."""
