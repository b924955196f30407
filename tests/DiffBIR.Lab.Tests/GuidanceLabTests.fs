/// The lab's guidance extensions: weight-map normalisations (checked against a hand computation in plain F# arrays),
/// per-sample guidance in one batch, the per-step recorder.
module DiffBIR.Lab.Tests.GuidanceLabTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Guidance
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Tests.TestSupport

let private maxAbs (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().item<float32>() |> float

// ---------------------------------------------------------------- hand computation (no torch)

/// Sobel magnitude of one RGB image given as float[c][y][x], by the paper's definition: grey = 0.2989R + 0.5870G +
/// 0.1140B, replicate padding, Gx = [[1,0,−1],[2,0,−2],[1,0,−1]], Gy = [[1,2,1],[0,0,0],[−1,−2,−1]] (cross-correlation).
let private sobelByHand (img: float[][][]) =
    let h, w = img.[0].Length, img.[0].[0].Length
    let grey y x =
        let y, x = max 0 (min (h - 1) y), max 0 (min (w - 1) x)
        0.2989 * img.[0].[y].[x] + 0.5870 * img.[1].[y].[x] + 0.1140 * img.[2].[y].[x]
    let kx = array2D [ [ 1.; 0.; -1. ]; [ 2.; 0.; -2. ]; [ 1.; 0.; -1. ] ]
    let ky = array2D [ [ 1.; 2.; 1. ]; [ 0.; 0.; 0. ]; [ -1.; -2.; -1. ] ]
    Array.init h (fun y -> Array.init w (fun x ->
        let mutable gx, gy = 0.0, 0.0
        for dy in 0 .. 2 do
            for dx in 0 .. 2 do
                let v = grey (y + dy - 1) (x + dx - 1)
                gx <- gx + kx.[dy, dx] * v
                gy <- gy + ky.[dy, dx] * v
        sqrt (gx * gx + gy * gy)))

/// Patch sums and pixel counts of p×p patches anchored top-left; partial edge patches hold fewer pixels.
let private patchesByHand (mag: float[][]) p =
    let h, w = mag.Length, mag.[0].Length
    let ph, pw = (h + p - 1) / p, (w + p - 1) / p
    Array.init ph (fun i -> Array.init pw (fun j ->
        let cells = [ for y in i * p .. min h (i * p + p) - 1 do for x in j * p .. min w (j * p + p) - 1 -> mag.[y].[x] ]
        List.sum cells, float cells.Length))

/// numpy.percentile (linear interpolation) of a list.
let private percentileByHand (values: float list) (q: float) =
    let s = List.sort values |> Array.ofList
    let pos = q / 100.0 * float (s.Length - 1)
    let lo = int (floor pos)
    let hi = min (lo + 1) (s.Length - 1)
    s.[lo] + (s.[hi] - s.[lo]) * (pos - float lo)

/// W = 1 − tanh(normalised patch statistic) per pixel, by hand.
let private weightByHand (img: float[][][]) p (norm: string) =
    let mag = sobelByHand img
    let patches = patchesByHand mag p
    let sums = [ for row in patches do for (s, _) in row -> s ]
    let stat (s, k) =
        match norm with
        | "sum" -> s
        | "sum:0.25" -> s / 0.25
        | "sum:8" -> s / 8.0
        | "mean" -> s / k
        | "max" -> s / List.max sums
        | "percentile:30" -> s / percentileByHand sums 30.0
        | "percentile:100" -> s / percentileByHand sums 100.0
        | other -> failwithf "no hand computation for %s" other
    Array.init mag.Length (fun y -> Array.init mag.[0].Length (fun x -> 1.0 - tanh (stat patches.[y / p].[x / p])))

let private smallBatch () =
    let g = new torch.Generator(77UL)
    // a ramp plus noise so that the patch sums differ a lot between patches
    let ramp = torch.linspace(0.0, 1.0, 9L).view(1L, 1L, 1L, 9L).expand(2L, 3L, 7L, 9L)
    (ramp * 0.6 + torch.rand([| 2L; 3L; 7L; 9L |], generator = g) * 0.4).contiguous()

let private toArrays (t: torch.Tensor) n =
    Array.init 3 (fun c -> Array.init (int t.shape.[2]) (fun y -> Array.init (int t.shape.[3]) (fun x ->
        float (t.[int64 n, int64 c, int64 y, int64 x].item<float32>()))))

[<Theory>]
[<InlineData("sum")>]
[<InlineData("sum:0.25")>]
[<InlineData("sum:8")>]
[<InlineData("mean")>]
[<InlineData("max")>]
[<InlineData("percentile:30")>]
[<InlineData("percentile:100")>]
let ``each weight-map normalisation equals its hand computation (3×3 patches on 7×9 images, partial edges, per image)`` (norm: string) =
    use img = smallBatch ()
    let parsed = WeightMapNorm.Parse norm
    use w = GradientMap.WeightMap(img, 3, parsed)
    w.shape |> should equal [| 2L; 1L; 7L; 9L |]
    for n in 0 .. 1 do
        let expected = weightByHand (toArrays img n) 3 norm
        for y in 0 .. 6 do
            for x in 0 .. 8 do
                float (w.[int64 n, 0L, int64 y, int64 x].item<float32>()) |> should (equalWithin 5e-6) expected.[y].[x]
    // the map is informative: not saturated to 0 nor flat at 1 (except the official sum and a cold temperature)
    if norm <> "sum" && norm <> "sum:0.25" then
        float (w.min().item<float32>()) |> should be (lessThan 0.6)
        float (w.max().item<float32>()) |> should be (greaterThan 0.2)

[<Fact>]
let ``per-image normalisations divide each image by its own statistic`` () =
    use img = smallBatch ()
    // scaling one image of the batch changes its patch sums by the same factor: max and percentile maps are unchanged
    let scaled = torch.cat([| img.narrow(0L, 0L, 1L) * 0.5; img.narrow(0L, 1L, 1L) |], 0L)
    for norm in [ WeightMapNorm.ImageMax; WeightMapNorm.Percentile 30.0 ] do
        use a = GradientMap.WeightMap(img, 3, norm)
        use b = GradientMap.WeightMap(scaled, 3, norm)
        maxAbs a b |> should be (lessThan 1e-6)
    // while the official sum is not scale-free (the comparison can fail)
    maxAbs (GradientMap.WeightMap(img, 3)) (GradientMap.WeightMap(scaled, 3)) |> should be (greaterThan 1e-3)
    // a flat image: no division by zero, W = 1
    use flat = torch.ones([| 1L; 3L; 8L; 8L |]) * 0.3f
    use wf = GradientMap.WeightMap(flat, 4, WeightMapNorm.ImageMax)
    float (wf.min().item<float32>()) |> should equal 1.0

[<Fact>]
let ``the default normalisation is the official map: bit-identical, and the v2.0.0 weight-map fixture still matches`` () =
    use f = Fixture.Load(fixture (Path.Combine("v2.0.0", "weight_map.safetensors")))
    let image = f.In "wmap0.image"
    use official = GradientMap.WeightMap(image, 2)
    use named = GradientMap.WeightMap(image, 2, WeightMapNorm.Parse "sum")
    use t1 = GradientMap.WeightMap(image, 2, WeightMapNorm.Parse "sum:1")
    official.equal(named).all().item<bool>() |> should be True
    official.equal(t1).all().item<bool>() |> should be True
    maxAbs named (f.Out "wmap0.weight") |> should be (lessThanOrEqualTo 1.2e-7)
    WeightedMseGuidance().Norm |> should equal WeightMapNorm.Sum
    WeightMapNorm.Sum.IsOfficial |> should be True
    assertParity (Path.Combine("v2.0.0", "weight_map.safetensors")) |> ignore
    assertParity "guidance.safetensors" |> ignore
    // another normalisation really gives another map
    maxAbs named (GradientMap.WeightMap(image, 2, WeightMapNorm.Mean)) |> should be (greaterThan 1e-3)

[<Fact>]
let ``weight-map normalisations parse by name and refuse bad names and parameters with the forms`` () =
    for text in [ "sum"; "sum:2.5"; "mean"; "max"; "percentile:90" ] do
        (WeightMapNorm.Parse text).ToString() |> should equal text
    WeightMapNorm.Parse "sum:1" |> should equal WeightMapNorm.Sum
    for bad in [ "median"; ""; "sum:0"; "sum:-1"; "sum:NaN"; "sum:Infinity"; "sum:x"; "mean:2"; "max:1"; "percentile"; "percentile:0"; "percentile:100.5"; "percentile:-5" ] do
        let e = Assert.Throws<FormatException>(fun () -> WeightMapNorm.Parse bad |> ignore)
        e.Message |> should haveSubstring (sprintf "'%s'" bad)

// ---------------------------------------------------------------- per-sample guidance in one batch

[<Fact>]
let ``per-sample guidance applies each member to its own sample: equal to one guide per sample`` () =
    let g = new torch.Generator(5UL)
    use x0 = torch.randn([| 3L; 4L; 8L; 8L |], generator = g)
    use target = torch.rand([| 3L; 3L; 8L; 8L |], generator = g) * 2.0 - 1.0
    // a differentiable stand-in for the VAE decoder: latent → RGB in [−1, 1]
    let decode = Func<torch.Tensor, torch.Tensor>(fun z -> z.narrow(1L, 0L, 3L).tanh())
    let members : RestorationGuidance list =
        [ WeightedMseGuidance(Scale = 0.2, PatchSize = 1)
          WeightedMseGuidance(Scale = 0.05, PatchSize = 4, Norm = WeightMapNorm.Mean, Schedule = GuidanceSchedule.Linear(0.0, 1.0))
          MseGuidance(Scale = 0.3, TStart = 400) ]        // not active at t = 500
    let t = 500
    let batched = Guide(PerSampleGuidance(members), target, Decode = decode).Apply(x0, t, 0.7)
    batched.Applied |> should be True
    for n in 0 .. 2 do
        let one = Guide(members.[n], target.narrow(0L, int64 n, 1L), Decode = decode).Apply(x0.narrow(0L, int64 n, 1L), t, 0.7)
        maxAbs (batched.X0.narrow(0L, int64 n, 1L)) one.X0 |> should be (lessThan 1e-6)
    // the inactive member's sample is untouched, the others moved (the comparison can fail)
    maxAbs (batched.X0.narrow(0L, 2L, 1L)) (x0.narrow(0L, 2L, 1L)) |> should equal 0.0
    maxAbs (batched.X0.narrow(0L, 0L, 1L)) (x0.narrow(0L, 0L, 1L)) |> should be (greaterThan 1e-4)

[<Fact>]
let ``per-sample guidance reports each sample's loss, the one-at-a-time loss, averaged over repeats`` () =
    let g = new torch.Generator(6UL)
    use x0 = torch.randn([| 2L; 3L; 8L; 8L |], generator = g)
    use target = torch.rand([| 2L; 3L; 8L; 8L |], generator = g) * 2.0 - 1.0
    let members : RestorationGuidance list =
        [ MseGuidance(Scale = 0.01, Space = GuidanceSpace.Latent, Repeat = 2)
          WeightedMseGuidance(Scale = 0.02, Space = GuidanceSpace.Latent, Repeat = 2, PatchSize = 1) |> fun w -> w :> RestorationGuidance ]
    // weighted MSE in latent space needs an RGB-shaped target: use 3-channel "latents"
    let psg = PerSampleGuidance(members)
    let r = Guide(psg, target).Apply(x0, 700)
    let losses = psg.TakeSampleLosses()
    for n in 0 .. 1 do
        let one = Guide(members.[n], target.narrow(0L, int64 n, 1L)).Apply(x0.narrow(0L, int64 n, 1L), 700)
        losses.[n].Value |> should (equalWithin 1e-6) one.Loss.Value
    // the batch's loss is the sum of the samples' (mean over repeats)
    r.Loss.Value |> should (equalWithin 1e-6) (losses.[0].Value + losses.[1].Value)
    psg.TakeSampleLosses() |> should equal [| Nullable(); Nullable() |]

[<Fact>]
let ``per-sample guidance refuses members of different spaces or repeat counts`` () =
    (fun () -> PerSampleGuidance([ MseGuidance() :> RestorationGuidance; MseGuidance(Space = GuidanceSpace.Latent) ]) |> ignore)
    |> should throw typeof<ArgumentException>
    (fun () -> PerSampleGuidance([ MseGuidance() :> RestorationGuidance; MseGuidance(Repeat = 3) ]) |> ignore)
    |> should throw typeof<ArgumentException>

// ---------------------------------------------------------------- per-step recorder, schedules as functions

open DiffBIR.Lab.Pipeline
open DiffBIR.Lab.Sweeps

/// f(t) = 0 for the noisy half (t ≥ 500), 1 below: an F# lambda as a guidance schedule.
let private late = GuidanceSchedule(Func<int, float>(fun t -> if t >= 500 then 0.0 else 1.0), "late half")

[<Fact>]
let ``the step recorder keeps every step's z_t, x̂₀ before and after guidance, loss, gradient norm and |Δx̂₀| past the run`` () =
    use preset = Presets.Build("tiny", "sr", fixturesDir)
    use lq = SweepTests.testImage ()
    let options = PipelineOptions(Steps = 4, Sampler = "ddim", Seed = 7L, Guidance = WeightedMseGuidance(Scale = 0.3, Schedule = late))
    use condition = preset.Condition(lq, options)
    // what the loop shows a plain observer (copied out of each step's scope by hand)
    let seen = ResizeArray<int * float option * torch.Tensor * torch.Tensor>()
    let plain = Func<DiffBIR.Lab.Sampling.StepInfo, bool>(fun info ->
        let keep (t: torch.Tensor) = let c = t.detach().clone() in c.DetachFromDisposeScope() |> ignore; c
        seen.Add((info.Timestep, Option.ofNullable info.GuidanceLoss, keep info.ModelX0, keep info.PredictedX0)); true)
    use r1 = preset.Sample(condition, options, stepObserver = plain)
    use recorder = new StepRecorder(Decode = true)
    use r2 = preset.Sample(condition, options, stepObserver = recorder.Observer)
    recorder.Steps.Count |> should equal 4
    GC.Collect()
    for (s, (t, loss, modelX0, guidedX0)) in Seq.zip recorder.Steps seen do
        s.Timestep |> should equal t
        maxAbs s.ModelX0 modelX0 |> should equal 0.0
        maxAbs s.GuidedX0 guidedX0 |> should equal 0.0
        s.Zt.shape |> should equal modelX0.shape
        (if s.GuidanceLoss.HasValue then Some s.GuidanceLoss.Value else None) |> should equal loss
        s.MeanAbsDeltaX0 |> should (equalWithin 1e-7) (float ((guidedX0 - modelX0).abs().mean().item<float32>()))
        s.ModelImage.shape |> should equal [| 1L; 3L; modelX0.shape.[2] * 8L; modelX0.shape.[3] * 8L |]
        float (s.GuidedImage.min().item<float32>()) |> should be (greaterThanOrEqualTo 0.0)
        float (s.GuidedImage.max().item<float32>()) |> should be (lessThanOrEqualTo 1.0)
    // the lambda schedule: no pull while t ≥ 500, a pull below (guided images then differ from the model's)
    for s in recorder.Steps do
        s.GuidanceApplied |> should be True
        if s.Timestep >= 500 then s.MeanAbsDeltaX0 |> should equal 0.0
        else
            s.MeanAbsDeltaX0 |> should be (greaterThan 1e-5)
            s.GradientNorm.Value |> should be (greaterThan 0.0)
    recorder.Steps |> Seq.exists (fun s -> s.Timestep < 500) |> should be True
    recorder.Steps |> Seq.exists (fun s -> s.Timestep >= 500) |> should be True
    for (_, _, a, b) in seen do a.Dispose(); b.Dispose()

[<Fact>]
let ``a sweep spec takes a guidance schedule as an F# function, known by its values`` () =
    use dir = new TempDir()
    use lq = SweepTests.testImage ()
    DiffBIR.Lab.IO.ImageIO.Save(dir.File "lq.png", lq)
    let spec (f: int -> float) =
        SweepSpec.On(dir.File "lq.png").Fixed("guidance", "wmse").Fixed("g_scale", 0.2)
            .Schedule("late", Func<int, float>(f)).Grid("g_schedule", "constant", "fn:late")
    let points = SweepPlan.Expand(spec (fun t -> if t >= 500 then 0.0 else 1.0), "tiny", Presets.Tiny.Defaults)
    points.Count |> should equal 2
    let g = points.[1].Options.Guidance
    g.ScaleAt(900) |> should equal 0.0
    g.ScaleAt(100) |> should equal 0.2
    points.[0].Options.Guidance.ScaleAt(900) |> should equal 0.2
    string (points.[1].Settings.ToJson().["g_schedule"]) |> should equal "fn:late"
    // another function under the same name is another point (a rerun does not mistake it for the old one)
    let other = SweepPlan.Expand(spec (fun t -> if t >= 400 then 0.0 else 1.0), "tiny", Presets.Tiny.Defaults)
    other.[0].Id |> should equal points.[0].Id
    other.[1].Id |> should not' (equal points.[1].Id)
    // a name with no function is refused with the field
    let e = Assert.Throws<SweepSpecException>(fun () ->
        SweepPlan.Expand(SweepSpec.On(dir.File "lq.png").Fixed("guidance", "wmse").Grid("g_schedule", "fn:nope"), "tiny", Presets.Tiny.Defaults) |> ignore)
    e.Message |> should haveSubstring "grid.g_schedule[0]"
    e.Message |> should haveSubstring "no schedule function 'nope'"

// ---------------------------------------------------------------- PNG export of charts

[<Fact>]
let ``charts export as PNG with a headless Chromium from PATH, or say that none was found`` () =
    match DiffBIR.Lab.Interactive.Charts.findBrowser () with
    | None ->
        DiffBIR.Lab.Interactive.Charts.noBrowserMessage |> should haveSubstring "chromium"
        Assert.Skip "no chromium, chromium-browser or google-chrome on PATH on this machine (savePng reports exactly that)"
    | Some _ ->
        use dir = new TempDir()
        let chart = DiffBIR.Lab.Interactive.Charts.metricVs [ 0.0; 1.0; 2.0 ] id (fun x -> x * x) (fun _ -> "x²") "x" "y"
        match DiffBIR.Lab.Interactive.Charts.savePng (dir.File "c.png") chart with
        | Error e -> failwithf "savePng failed: %s" e
        | Ok path ->
            let bytes = File.ReadAllBytes path
            bytes.[0..7] |> should equal [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |]
            use img = DiffBIR.Lab.IO.ImageIO.Load path
            img.Image.shape.[2] |> should equal (int64 DiffBIR.Lab.Interactive.Charts.DefaultHeight)

[<Fact>]
let ``results-table cells read as numbers whatever their .NET type (rows made in memory keep ints as ints)`` () =
    let row = System.Text.Json.Nodes.JsonObject()
    row.["i"] <- System.Text.Json.Nodes.JsonValue.Create 4
    row.["l"] <- System.Text.Json.Nodes.JsonValue.Create 5L
    row.["d"] <- System.Text.Json.Nodes.JsonValue.Create 0.25
    row.["s"] <- System.Text.Json.Nodes.JsonValue.Create "1.5"
    row.["t"] <- System.Text.Json.Nodes.JsonValue.Create "sum"
    DiffBIR.Lab.Interactive.SweepCharts.Number(row, "i") |> should equal 4.0
    DiffBIR.Lab.Interactive.SweepCharts.Number(row, "l") |> should equal 5.0
    DiffBIR.Lab.Interactive.SweepCharts.Number(row, "d") |> should equal 0.25
    DiffBIR.Lab.Interactive.SweepCharts.Number(row, "s") |> should equal 1.5
    Double.IsNaN(DiffBIR.Lab.Interactive.SweepCharts.Number(row, "t")) |> should be True
    Double.IsNaN(DiffBIR.Lab.Interactive.SweepCharts.Number(row, "missing")) |> should be True
