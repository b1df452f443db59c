"""placeholder"""
from dash import html


def layout(ctx):
    return html.Div(id="flow-body")


def register(app, ctx):
    pass
