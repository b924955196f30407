/// Views of the per-step recorder (DiffBIR.Lab.Sweeps.StepRecorder): a frame grid of x̂₀ per step and the guidance
/// loss, gradient norm and |Δx̂₀| against the timestep t.
namespace DiffBIR.Lab.Interactive

open System.Globalization
open Plotly.NET
open DiffBIR.Lab.Sweeps

module StepViews =
    let private num (v: System.Nullable<float>) = if v.HasValue then v.Value.ToString("G3", CultureInfo.InvariantCulture) else "–"

    /// The caption of one step: its index, t and (when guided) the loss and |Δx̂₀|.
    let caption (s: RecordedStep) =
        if s.GuidanceApplied then sprintf "step %d · t=%d · loss %s · |Δx̂₀| %.3g" s.Step s.Timestep (num s.GuidanceLoss) s.MeanAbsDeltaX0
        else sprintf "step %d · t=%d" s.Step s.Timestep

    /// A grid of the decoded x̂₀ of each recorded step (record with Decode = true), after guidance; with
    /// <paramref name="both"/> also before (the network's own), captioned with step, t and the guidance numbers.
    /// Steps recorded without images are shown as their latent's first three channels.
    let frames (both: bool) (steps: seq<RecordedStep>) : ImageGrid =
        let steps = List.ofSeq steps
        let img (decoded: TorchSharp.torch.Tensor) (latent: TorchSharp.torch.Tensor) =
            if isNull decoded then
                let x = latent.narrow(1L, 0L, 3L)
                let lo, hi = x.min(), x.max()
                (x - lo) / (hi - lo + 1e-8)
            else decoded
        let items =
            [ for s in steps do
                if both then
                    yield { Caption = sprintf "%s · model x̂₀" (caption s); Image = img s.ModelImage s.ModelX0 }
                    yield { Caption = sprintf "%s · guided x̂₀" (caption s); Image = img s.GuidedImage s.GuidedX0 }
                else yield { Caption = caption s; Image = img s.GuidedImage s.GuidedX0 } ]
        let cols = if both then 2 * min 3 (max 1 steps.Length) else min 6 (max 1 steps.Length)
        { Items = items; Columns = cols; Width = 160 }

    /// Guidance loss, gradient norm and mean |Δx̂₀| against the timestep t (the run goes right to left: t falls),
    /// stacked in three panels; steps outside the guidance window have no point.
    let chart (steps: seq<RecordedStep>) : GenericChart =
        let guided = steps |> Seq.filter (fun s -> s.GuidanceApplied) |> List.ofSeq
        let line (name: string) (f: RecordedStep -> float) =
            Chart.Line(x = (guided |> List.map (fun s -> s.Timestep)), y = (guided |> List.map f), Name = name, ShowMarkers = true)
        let value (v: System.Nullable<float>) = if v.HasValue then v.Value else nan
        [ line "guidance loss" (fun s -> value s.GuidanceLoss) |> Chart.withYAxisStyle (TitleText = "loss")
          line "gradient norm" (fun s -> value s.GradientNorm) |> Chart.withYAxisStyle (TitleText = "‖∇‖")
          line "mean |Δx̂₀|" (fun s -> s.MeanAbsDeltaX0) |> Chart.withYAxisStyle (TitleText = "|Δx̂₀|") ]
        |> Chart.Grid(3, 1)
        |> Chart.withXAxisStyle (TitleText = "t")
        |> Chart.withTitle "guidance per step against the timestep t (a run goes from t = 999 down to 0)"
        |> Chart.withSize (Charts.DefaultWidth, 700)

    /// The recorded numbers as rows (one per step) for a table.
    let table (steps: seq<RecordedStep>) =
        [ for s in steps ->
            {| step = s.Step; t = s.Timestep; guided = s.GuidanceApplied; loss = num s.GuidanceLoss; gradient_norm = num s.GradientNorm
               mean_abs_delta_x0 = s.MeanAbsDeltaX0 |} ]
