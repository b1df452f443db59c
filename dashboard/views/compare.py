"""placeholder"""
from dash import html


def layout(ctx):
    return html.Div(id="compare-body")


def register(app, ctx):
    pass
