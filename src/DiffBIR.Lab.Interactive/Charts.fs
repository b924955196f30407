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

    /// A headless Chromium on PATH (chromium, chromium-browser, google-chrome, google-chrome-stable), or None.
    let findBrowser () : string option =
        let dirs = (defaultArg (Option.ofObj (System.Environment.GetEnvironmentVariable "PATH")) "").Split(System.IO.Path.PathSeparator)
        [ "chromium"; "chromium-browser"; "google-chrome"; "google-chrome-stable" ]
        |> List.tryPick (fun name ->
            dirs |> Array.tryPick (fun d ->
                let f = System.IO.Path.Combine(d, name)
                if d <> "" && System.IO.File.Exists f then Some f else None))

    /// What savePng says when no browser is found.
    let noBrowserMessage =
        "no headless browser found on PATH (looked for chromium, chromium-browser, google-chrome, google-chrome-stable): " +
        "install Debian's chromium (apt-get install chromium) to export PNGs; the HTML version displays offline"

    /// Writes the chart as a PNG (its size, DefaultWidth × DefaultHeight unless set) by printing its standalone HTML
    /// page with a headless Chromium found on PATH (nothing is downloaded). Error when there is none (the message says
    /// so) or when the browser fails; the PNG is written atomically (nothing half-written).
    let savePng (path: string) (chart: GenericChart) : Result<string, string> =
        match findBrowser () with
        | None -> Error noBrowserMessage
        | Some browser ->
            let layout = GenericChart.getLayout chart
            let w = match layout.TryGetTypedPropertyValue<int> "width" with Some w -> w | None -> DefaultWidth
            let h = match layout.TryGetTypedPropertyValue<int> "height" with Some h -> h | None -> DefaultHeight
            let work = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "diffbir-lab-png-" + System.Guid.NewGuid().ToString("N"))
            System.IO.Directory.CreateDirectory work |> ignore
            try
                let html = System.IO.Path.Combine(work, "chart.html")
                // no page margin, so that the screenshot is the chart
                let page = (toStandaloneHtml (chart |> Chart.withSize (w, h))).Replace("<head>", "<head><style>body{margin:0}</style>")
                System.IO.File.WriteAllText(html, page)
                let shot = System.IO.Path.Combine(work, "chart.png")
                let psi = System.Diagnostics.ProcessStartInfo(browser)
                for a in [ "--headless"; "--no-sandbox"; "--disable-gpu"; "--disable-dev-shm-usage"; "--disable-background-networking"
                           "--disable-component-update"; "--disable-sync"; "--no-first-run"; "--hide-scrollbars"
                           "--virtual-time-budget=10000"; sprintf "--user-data-dir=%s" (System.IO.Path.Combine(work, "profile"))
                           sprintf "--window-size=%d,%d" w h; sprintf "--screenshot=%s" shot; System.Uri(html).AbsoluteUri ] do
                    psi.ArgumentList.Add a
                psi.RedirectStandardOutput <- true
                psi.RedirectStandardError <- true
                psi.UseShellExecute <- false
                use p = System.Diagnostics.Process.Start psi
                let err = p.StandardError.ReadToEndAsync()
                p.StandardOutput.ReadToEnd() |> ignore
                if not (p.WaitForExit 120000) then
                    p.Kill true
                    Error(sprintf "%s did not finish the PNG of %s within 120 s" browser path)
                elif not (System.IO.File.Exists shot) then
                    let lastLine = err.Result.Trim().Split('\n') |> Array.last
                    Error(sprintf "%s wrote no PNG (exit %d): %s" browser p.ExitCode lastLine)
                else
                    let tmp = path + ".tmp"
                    System.IO.File.Copy(shot, tmp, true)
                    System.IO.File.Move(tmp, path, true)
                    Ok path
            finally
                try System.IO.Directory.Delete(work, true) with _ -> ()

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
            | System.Text.Json.JsonValueKind.Number ->
                // a value made in memory keeps its .NET type (int, long, double): read its JSON text
                Some(System.Double.Parse(v.ToJsonString(), System.Globalization.CultureInfo.InvariantCulture))
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

    /// Writes the chart as a PNG with a headless Chromium on PATH (<see cref="Charts.savePng"/>): Ok path, or Error
    /// saying why not (no browser, nothing to draw, the browser failed).
    static member SaveQualityFidelityPng(rows: seq<System.Text.Json.Nodes.JsonObject>, quality: string, fidelity: string,
                                         seriesBy: string[], labelBy: string, path: string) : Result<string, string> =
        match SweepCharts.QualityFidelity(rows, quality, fidelity, seriesBy, labelBy) with
        | Some c -> Charts.savePng path c
        | None -> Error "nothing to draw (fewer than two rows with both metrics)"

    /// Writes the chart as a standalone HTML page (plotly.js inlined); false when there was nothing to draw.
    static member SaveQualityFidelity(rows: seq<System.Text.Json.Nodes.JsonObject>, quality: string, fidelity: string,
                                      seriesBy: string[], labelBy: string, path: string) : bool =
        match SweepCharts.QualityFidelity(rows, quality, fidelity, seriesBy, labelBy) with
        | Some c -> Charts.saveHtml path c; true
        | None -> false
