"""placeholder"""
from dash import html


def layout(ctx):
    return html.Div(id="filmstrip-body")


def register(app, ctx):
    pass
