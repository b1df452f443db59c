"""placeholder"""
from dash import html


def layout(ctx):
    return html.Div(id="intervene-body")


def register(app, ctx):
    pass
