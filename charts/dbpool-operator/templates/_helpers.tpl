{{/* The chart's name, overridable. */}}
{{- define "dbpool-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: the release name, followed by the chart's name unless
the release name already contains it. 63 characters at most (DNS label).
*/}}
{{- define "dbpool-operator.fullname" -}}
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

{{- define "dbpool-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "dbpool-operator.labels" -}}
helm.sh/chart: {{ include "dbpool-operator.chart" . }}
{{ include "dbpool-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: dbpool-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods (immutable in the Deployment: keep them stable). */}}
{{- define "dbpool-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dbpool-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dbpool-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dbpool-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "dbpool-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's API permissions on DbPools, their status, Secrets and events: the ClusterRole's
rules in cluster mode, the watched namespace's Role rules in namespace mode. The chart's README
explains each rule. Nothing here deletes, and nothing touches pods.
*/}}
{{- define "dbpool-operator.operatorRules" -}}
- apiGroups: [dbpool.io]
  resources: [dbpools]
  verbs: [get, list, watch, patch]
- apiGroups: [dbpool.io]
  resources: [dbpools/status]
  verbs: [get, patch]
# list/watch: a metadata-only watch that notices Secrets being created or rotated;
# get: reads the one key a DbPool's spec names (password or CA).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.gates.enabled }}
# spec.gate (gates.enabled): the selector-less Service and EndpointSlice the operator owns.
# create: a server-side apply that makes the object is authorized as a create (found by
# hack/test-node.sh: with patch alone the first gate write is refused, 403).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, create, patch, delete]
{{- end }}
{{- end }}

{{/* Fails rendering on combinations that cannot work. */}}
{{- define "dbpool-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: replicas without it would all probe and write status" }}
{{- end }}
{{- end }}

{{/* An alert's `for:` line from a prometheusRule.for value; none for "0s" (fire at once). */}}
{{- define "dbpool-operator.alertFor" -}}
{{- if not (has (toString .) (list "" "0" "0s")) }}
{{- printf "for: %s" (toString .) }}
{{- end }}
{{- end }}
