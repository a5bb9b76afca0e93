"""The application layer: what a verb does end to end (load, measure, fold, check, export, bench),
as library functions returning typed results; ``commands/`` only parses options and renders them."""
