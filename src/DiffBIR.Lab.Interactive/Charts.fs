/// Plotly.NET charts that display offline (plotly.js inlined, no CDN) with a size that fits their titles, and the
/// lab's standard views: the quality–fidelity curve and a metric against a swept parameter.
namespace DiffBIR.Lab.Interactive

open System.Net
open Plotly.NET

module Charts =
    /// Default size of a chart in a notebook or HTML report (wide enough for long titles).
    let mutable DefaultWidth = 900
    let mutable DefaultHeight = 520

    /// The chart as a standalone HTML page with plotly.js inlined (≈ 3.6 MB): it displays without any network.
    let toStandaloneHtml (chart: GenericChart) =
        chart
        |> Chart.withDisplayOptions (DisplayOptions.init (PlotlyJSReference = PlotlyJSReference.Full))
        |> GenericChart.toEmbeddedHTML

    /// The chart as a notebook output: an iframe whose document carries plotly.js itself, so executed notebooks show
    /// their charts offline (in Jupyter, VS Code and nbconvert's HTML), each chart isolated from the others.
    let toNotebookHtml (chart: GenericChart) =
        let layout = GenericChart.getLayout chart
        let w = match layout.TryGetTypedPropertyValue<int> "width" with Some w -> w | None -> DefaultWidth
        let h = match layout.TryGetTypedPropertyValue<int> "height" with Some h -> h | None -> DefaultHeight
        let sized = chart |> Chart.withSize (w, h)
        sprintf "<iframe style='border:0' width='%d' height='%d' srcdoc=\"%s\"></iframe>"
            (w + 30) (h + 30) (WebUtility.HtmlEncode(toStandaloneHtml sized))

    /// Writes the chart as a standalone HTML file (plotly.js inlined) atomically.
    let saveHtml (path: string) (chart: GenericChart) =
        let tmp = path + ".tmp"
        System.IO.File.WriteAllText(tmp, toStandaloneHtml (chart |> Chart.withSize (DefaultWidth, DefaultHeight)))
        System.IO.File.Move(tmp, path, true)

    /// One line per series, points labelled: x = a no-reference quality metric, y = a fidelity metric, a point per
    /// guidance setting (label = e.g. the scale s). Rows are grouped by <paramref name="series"/> and drawn in the
    /// order of <paramref name="order"/> within a series.
    let qualityFidelity (rows: seq<'T>) (quality: 'T -> float) (fidelity: 'T -> float) (series: 'T -> string)
                        (label: 'T -> string) (order: 'T -> float) (qualityName: string) (fidelityName: string) =
        rows
        |> Seq.groupBy series
        |> Seq.map (fun (name, rs) ->
            let rs = rs |> Seq.sortBy order |> List.ofSeq
            Chart.Line(
                x = (rs |> List.map quality), y = (rs |> List.map fidelity), Name = name, ShowMarkers = true,
                MultiText = (rs |> List.map label), TextPosition = StyleParam.TextPosition.TopCenter))
        |> Chart.combine
        |> Chart.withXAxisStyle (TitleText = qualityName)
        |> Chart.withYAxisStyle (TitleText = fidelityName)
        |> Chart.withTitle (sprintf "quality–fidelity: %s vs %s" fidelityName qualityName)
        |> Chart.withSize (DefaultWidth, DefaultHeight)

    /// A metric against a swept parameter, one line per series.
    let metricVs (rows: seq<'T>) (x: 'T -> float) (y: 'T -> float) (series: 'T -> string) (xName: string) (yName: string) =
        rows
        |> Seq.groupBy series
        |> Seq.map (fun (name, rs) ->
            let rs = rs |> Seq.sortBy x |> List.ofSeq
            Chart.Line(x = (rs |> List.map x), y = (rs |> List.map y), Name = name, ShowMarkers = true))
        |> Chart.combine
        |> Chart.withXAxisStyle (TitleText = xName)
        |> Chart.withYAxisStyle (TitleText = yName)
        |> Chart.withTitle (sprintf "%s vs %s" yName xName)
        |> Chart.withSize (DefaultWidth, DefaultHeight)
