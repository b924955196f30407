/// Restoration guidance acts with every sampler, and the same scale s means about the same pull: with an ideal
/// denoiser (the exact posterior mean of a Gaussian prior around one clean latent z*), latent-space MSE guidance toward a
/// different target must bring the sampled latent monotonically closer to the target as s grows, for every sampler
/// of both schedules (v2: ε, v2.1: v with zero terminal SNR). A random-weight network cannot show this: its latents
/// reach |x̂₀| ≈ 10⁵ and saturate the decoder, whatever the guidance does.
module DiffBIR.Lab.Tests.GuidanceAllSamplersTests

open System
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Diffusion
open DiffBIR.Lab.Sampling
open DiffBIR.Lab.Guidance
open DiffBIR.Lab.Stages

/// The ideal ε- or v-model of a Gaussian prior N(z*, 0.5·I) around one clean latent z*: x̂₀ is the exact posterior
/// mean z* + 0.5·√ᾱ/(0.5·ᾱ + 1 − ᾱ)·(x_t − √ᾱ·z*), so it follows the state (a guided state gives a closer x̂₀ next
/// step). Continuous DPM-Solver times are rounded to the grid.
/// EDM samplers see ᾱ(999) as 1e-8 (σ_max = 10⁴, as the official EDMSampler forces it): the ideal model there knows that.
let private oracle (schedule: NoiseSchedule) (edm: bool) (zStar: torch.Tensor) =
    let table = schedule.AlphasCumprod() |> Array.copy
    if edm then table.[table.Length - 1] <- 1e-8
    let ac = torch.tensor(table).to_type(torch.float32)
    let v = 0.5f
    { new IDenoiser with
        member _.Forward(x, t, _) =
            let idx = t.to_type(torch.float32).round().clamp(torch.tensor 0.0f, torch.tensor 999.0f).to_type(torch.int64)
            let a = ac.index_select(0L, idx).view(-1L, 1L, 1L, 1L)
            let sa, s1 = a.sqrt(), (torch.tensor 1.0f - a).sqrt()
            let x0 = zStar + (sa * v) / (a * v + (torch.tensor 1.0f - a)) * (x - sa * zStar)
            let eps = (x - sa * x0) / s1
            if schedule.Parameterization = Parameterization.Eps then eps
            else sa * eps - s1 * x0 }

let scales = [ 0.0; 0.001; 0.003; 0.01 ]

/// Mean squared distance of the sampled latent to the target, and the guidance loss at the last guided step.
let private run (schedule: NoiseSchedule) (name: string) (s: float) =
    use scope = torch.NewDisposeScope()
    use g = new torch.Generator(7UL)
    let zStar = torch.randn([| 1L; 4L; 8L; 8L |], generator = g)
    let target = torch.randn([| 1L; 4L; 8L; 8L |], generator = g)
    use gx = new torch.Generator(3UL)
    let xT = torch.randn([| 1L; 4L; 8L; 8L |], generator = gx)
    let cond = Conditioning(torch.zeros(1L, 77L, 32L), zStar)
    let step = SampleStep(Samplers.Create(name, schedule, SamplerOptions(CfgScale = 1.0)), oracle schedule (name.StartsWith "edm_") zStar, cond, cond)
    let guide = if s = 0.0 then null else Guide(MseGuidance(Scale = s, Space = GuidanceSpace.Latent), target)
    let mutable lastLoss = nan
    let observer = Func<StepInfo, bool>(fun i -> (if i.GuidanceLoss.HasValue then lastLoss <- i.GuidanceLoss.Value); true)
    use noise = new SeededNoise(5L)
    let state = step.Start(xT, 10, noise)
    let z = SamplingLoop.Run(step, state, guide, observer)
    let d = (z - target).square().mean().item<float32>() |> float
    state.Dispose()
    d, lastLoss

let cases : TheoryData<string, string> =
    let d = TheoryData<string, string>()
    for schedule in [ "v2"; "v2.1" ] do
        for n in Samplers.Names do d.Add(schedule, n)
    d

[<Theory>]
[<MemberData(nameof cases)>]
let ``guidance pulls every sampler toward the target, more as s grows`` (scheduleName: string, sampler: string) =
    let schedule = if scheduleName = "v2" then NoiseSchedule.V2 else NoiseSchedule.V2_1
    let results = scales |> List.map (fun s -> s, run schedule sampler s)
    let psnr d = 10.0 * log10 (4.0 / d)
    let report =
        results |> List.map (fun (s, (d, l)) -> sprintf "s=%g: distance %.4f (PSNR %.2f dB), last loss %.4g" s d (psnr d) l) |> String.concat "; "
    printfn "%s %s: %s" scheduleName sampler report
    let distances = results |> List.map (fun (_, (d, _)) -> d)
    for a, b in List.pairwise distances do Assert.True(b < a, sprintf "not monotone: %s" report)
    // the same s means about the same pull: at s = 0.01 every sampler closes at least 30 % of the distance
    Assert.True(List.last distances < 0.7 * List.head distances, report)
    // the guidance loss at the last guided step falls as s grows
    let losses = results |> List.tail |> List.map (fun (_, (_, l)) -> l)
    for a, b in List.pairwise losses do Assert.True(b < a, sprintf "loss not falling: %s" report)
