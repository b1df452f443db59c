"""placeholder"""
from dash import html


def layout(ctx):
    return html.Div(id="training-body")


def register(app, ctx):
    pass
