"""Views of finished atlases for people: base-vs-other comparison, plots, and the HTML report."""
