'use strict';
// The trace types the dashboard draws, and nothing else: the full plotly.min.js is 4.8 MB, and
// parsing it in a fresh browser was most of the dashboard's first page (docs/dashboard.md).
// tests/test_plotly_bundle.py checks that every go.<Trace> the Python code builds is listed here
// (scatter is in the core).
var Plotly = require('plotly.js/lib/core');

Plotly.register([
    require('plotly.js/lib/bar'),
    require('plotly.js/lib/heatmap'),
    require('plotly.js/lib/histogram'),
    require('plotly.js/lib/sankey'),
    require('plotly.js/lib/scattergl'),
]);

module.exports = Plotly;
