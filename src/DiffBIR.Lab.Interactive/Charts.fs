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

/// Charts of a sweep's results table (rows as written to results.jsonl), for the CLI and notebooks.
type SweepCharts =
    static member private Node (row: System.Text.Json.Nodes.JsonObject) (key: string) : System.Text.Json.Nodes.JsonNode =
        let mutable v : System.Text.Json.Nodes.JsonNode = null
        if row.TryGetPropertyValue(key, &v) then v else null

    /// A results-table cell as a number (JSON number or numeric string); NaN when absent or not a number.
    static member Number(row: System.Text.Json.Nodes.JsonObject, key: string) : float =
        defaultArg (SweepCharts.Num row key) nan

    static member private Num (row: System.Text.Json.Nodes.JsonObject) (key: string) : float option =
        let v = SweepCharts.Node row key
        if isNull v then None
        else
            match v.GetValueKind() with
            | System.Text.Json.JsonValueKind.Number -> Some(v.GetValue<float>())
            | System.Text.Json.JsonValueKind.String ->
                let text : string = v.GetValue<string>()
                let mutable x = 0.0
                if System.Double.TryParse(text, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, &x) then Some x else None
            | _ -> None

    static member private Text (row: System.Text.Json.Nodes.JsonObject) (key: string) : string =
        let v = SweepCharts.Node row key
        if isNull v then "–" else v.ToString()

    /// Quality (x, a no-reference metric column) against fidelity (y, e.g. psnr_hq or psnr_irm), one line per
    /// combination of the <paramref name="seriesBy"/> columns, points ordered and labelled by <paramref name="labelBy"/>
    /// (e.g. g_scale). Rows without both numbers are left out. None when fewer than two rows qualify.
    static member QualityFidelity(rows: seq<System.Text.Json.Nodes.JsonObject>, quality: string, fidelity: string,
                                  seriesBy: string[], labelBy: string) : GenericChart option =
        let pts =
            rows
            |> Seq.choose (fun r ->
                match SweepCharts.Num r quality, SweepCharts.Num r fidelity with
                | Some q, Some f ->
                    let series = seriesBy |> Array.map (fun k -> sprintf "%s=%s" k (SweepCharts.Text r k)) |> String.concat ", "
                    let order = defaultArg (SweepCharts.Num r labelBy) 0.0
                    Some(series, q, f, sprintf "%s=%s" labelBy (SweepCharts.Text r labelBy), order)
                | _ -> None)
            |> List.ofSeq
        if pts.Length < 2 then None
        else
            Some(Charts.qualityFidelity pts (fun (_, q, _, _, _) -> q) (fun (_, _, f, _, _) -> f) (fun (s, _, _, _, _) -> s)
                    (fun (_, _, _, l, _) -> l) (fun (_, _, _, _, o) -> o) quality fidelity)

    /// Writes the chart as a standalone HTML page (plotly.js inlined); false when there was nothing to draw.
    static member SaveQualityFidelity(rows: seq<System.Text.Json.Nodes.JsonObject>, quality: string, fidelity: string,
                                      seriesBy: string[], labelBy: string, path: string) : bool =
        match SweepCharts.QualityFidelity(rows, quality, fidelity, seriesBy, labelBy) with
        | Some c -> Charts.saveHtml path c; true
        | None -> false
