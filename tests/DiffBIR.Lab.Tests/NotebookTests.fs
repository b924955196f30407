/// The notebooks are the user's front end: every notebook in notebooks/ must run headlessly, and the runner must
/// stop at (and name) a failing cell.
module DiffBIR.Lab.Tests.NotebookTests

open System.IO
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open DiffBIR.Lab.Cli.Notebooks
open DiffBIR.Lab.Tests.TestSupport

let notebooks : TheoryData<string> =
    let d = TheoryData<string>()
    for f in Directory.GetFiles(Path.Combine(repoRoot, "notebooks"), "*.ipynb") |> Array.sort do d.Add(Path.GetFileName f)
    d

[<Theory>]
[<MemberData(nameof notebooks)>]
let ``notebook runs headlessly from first cell to last`` (name: string) =
    use dir = new TempDir()
    let result = NotebookRunner.Run(Path.Combine(repoRoot, "notebooks", name), NotebookRunOptions(OutputPath = dir.File name))
    Assert.True(result.Succeeded, sprintf "%s failed at cell %A: %s" name result.FailedCell result.Error)
    result.CellsRun |> should equal result.CodeCells
    File.Exists(dir.File name) |> should be True
    // Opened offline (a shared notebook, a cluster without internet), every output must still display: no script is
    // loaded from a URL (charts carry plotly.js), and no F# list renders as a Head / Tail property tree.
    let executed = File.ReadAllText(dir.File name)
    let decoded = System.Net.WebUtility.HtmlDecode(System.Net.WebUtility.HtmlDecode(System.Text.RegularExpressions.Regex.Unescape executed))
    let external = System.Text.RegularExpressions.Regex.Matches(decoded, @"<script[^>]*\bsrc\s*=\s*[""']?(https?:)?//[^""' >]+|require\.config\([^)]*https?://")
    Assert.True(external.Count = 0, sprintf "%s loads scripts from the network: %s" name (external |> Seq.map (fun m -> m.Value) |> Seq.truncate 3 |> String.concat ", "))
    executed |> should not' (haveSubstring "HeadOrDefault")
    executed |> should not' (haveSubstring "TailOrNull")

[<Theory>]
[<MemberData(nameof notebooks)>]
let ``notebook is committed with its outputs cleared`` (name: string) =
    NotebookRunner.HasOutputs(Path.Combine(repoRoot, "notebooks", name)) |> should be False

let private cell (src: string) =
    JsonObject(dict [ "cell_type", JsonValue.Create "code" :> JsonNode
                      "execution_count", null
                      "metadata", JsonObject(dict [ "polyglot_notebook", JsonObject(dict [ "kernelName", JsonValue.Create "fsharp" :> JsonNode ]) :> JsonNode ])
                      "outputs", JsonArray()
                      "source", JsonArray(JsonValue.Create src) ])

[<Fact>]
let ``a failing cell is reported with its number and error, and later cells do not run`` () =
    use dir = new TempDir()
    let marker = dir.File "third-cell-ran.txt"
    let nb =
        JsonObject(dict [ "cells", JsonArray(cell "let x = 40 + 2\nprintfn \"x = %d\" x",
                                             cell "let boom () : unit = failwith \"deliberate failure in cell two\"\nboom ()",
                                             cell (sprintf "System.IO.File.WriteAllText(@\"%s\", \"ran\")" marker)) :> JsonNode
                          "metadata", JsonObject(dict [ "polyglot_notebook", JsonObject(dict [ "defaultKernelName", JsonValue.Create "fsharp" :> JsonNode ]) :> JsonNode ])
                          "nbformat", JsonValue.Create 4
                          "nbformat_minor", JsonValue.Create 2 ])
    let path = dir.File "failing.ipynb"
    File.WriteAllText(path, nb.ToJsonString())
    let result = NotebookRunner.Run(path, NotebookRunOptions(ToolRoot = repoRoot, OutputPath = dir.File "executed.ipynb"))
    result.Succeeded |> should be False
    result.FailedCell |> should equal (Some 2 |> Option.toNullable)
    result.Error |> should haveSubstring "deliberate failure in cell two"
    File.Exists marker |> should be False
    // the executed copy holds the first cell's output and the error
    let executed = File.ReadAllText(dir.File "executed.ipynb")
    executed |> should haveSubstring "x = 42"
    executed |> should haveSubstring "deliberate failure"
