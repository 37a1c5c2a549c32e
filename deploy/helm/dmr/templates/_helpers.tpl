{{/* The chart's name, or nameOverride. */}}
{{- define "dmr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Deployment's and Service's name: the release name when it already contains the
chart's name (`helm install dmr ...` gives "dmr", as in deploy/kubernetes).
*/}}
{{- define "dmr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dmr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the release's objects. */}}
{{- define "dmr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dmr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dmr.labels" -}}
helm.sh/chart: {{ include "dmr.chart" . }}
{{ include "dmr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* image.repository:tag; the tag defaults to "cuda" with gpu.enabled, else "latest". */}}
{{- define "dmr.image" -}}
{{- $tag := .Values.image.tag | default (ternary "cuda" "latest" .Values.gpu.enabled) }}
{{- printf "%s:%s" .Values.image.repository (toString $tag) }}
{{- end }}

{{- define "dmr.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-models" (include "dmr.fullname" .)) }}
{{- end }}

{{/* The server container's resources: gpu.resources plus the GPU count with gpu.enabled. */}}
{{- define "dmr.resources" -}}
{{- if .Values.gpu.enabled }}
{{- $resources := deepCopy .Values.gpu.resources }}
{{- $count := toString .Values.gpu.count }}
{{- $_ := set $resources "requests" (merge (dict .Values.gpu.resourceName $count) ($resources.requests | default dict)) }}
{{- $_ := set $resources "limits" (merge (dict .Values.gpu.resourceName $count) ($resources.limits | default dict)) }}
{{- toYaml $resources }}
{{- else }}
{{- toYaml .Values.resources }}
{{- end }}
{{- end }}

{{/* DMR_API_KEY from apiKey.existingSecret, for the server and the pre-pull Job. */}}
{{- define "dmr.apiKeyEnv" -}}
- name: DMR_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret }}
      key: {{ .Values.apiKey.key }}
{{- end }}
